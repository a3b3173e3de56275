"""Which local path ``azstoragetorch cp`` gives a blob name: never one outside the destination."""

from __future__ import annotations

import pytest

from azstoragetorch._cli._local_paths import local_collisions, local_parts


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("model.pt", ("model.pt",)),
        ("dcp/__0_0.distcp", ("dcp", "__0_0.distcp")),
        (".metadata", (".metadata",)),
        ("a..b/..c/d..", ("a..b", "..c", "d..")),
        ("café/模型.pt", ("café", "模型.pt")),
        ("epoch=3:step=400.ckpt", ("epoch=3:step=400.ckpt",)),
    ],
)
def test_ordinary_names_become_paths_inside_the_destination(name: str, parts: tuple[str, ...]) -> None:
    assert local_parts(name) == parts


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("/tmp/elsewhere/file", "absolute"),
        ("/", "absolute"),
        ("a//b", "empty level"),
        ("a/", "empty level"),
        ("../escape", "'..'"),
        ("a/../../escape", "'..'"),
        ("a/./b", "'.'"),
        ("..", "'..'"),
        ("a\\..\\..\\b", "backslash"),
        ("c:\\windows", "backslash"),
        ("a\x00b", "control character '\\x00'"),
        ("a\nb", "control character"),
        ("a\x7fb", "control character"),
        ("\uff0e\uff0e/escape", "after Unicode normalisation"),  # fullwidth ".."
        ("a\uff3c..\uff3cb", "backslash after Unicode normalisation"),  # fullwidth backslash
        ("\uff0fetc/passwd", "absolute path after Unicode normalisation"),  # fullwidth "/"
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
    ],
)
def test_names_that_could_leave_the_destination_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(ValueError) as refused:
        local_parts(name)
    assert reason in str(refused.value)


def test_names_that_would_be_one_file_are_all_refused() -> None:
    names = [
        "Model.pt",
        "model.pt",
        "caf\u00e9.pt",  # NFC
        "cafe\u0301.pt",  # NFD: the same name on macOS, a look-alike elsewhere
        "\ufb01le.pt",  # the "fi" ligature: "file.pt" after NFKC
        "file.pt",
        "x",
        "x/y",
        "X/z",
        "ok/a.pt",
        "OK/b.pt",  # folders that merge on a case-insensitive disk lose nothing
        "fine.pt",
    ]
    refused = local_collisions({name: local_parts(name) for name in names})
    assert sorted(refused) == sorted(
        ["Model.pt", "model.pt", "caf\u00e9.pt", "cafe\u0301.pt", "\ufb01le.pt", "file.pt", "x", "x/y", "X/z"]
    )
    assert "'model.pt'" in refused["Model.pt"]
    assert "folder" in refused["x"] and "folder" in refused["X/z"]
