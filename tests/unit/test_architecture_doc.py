"""docs/architecture.rst names the modules that exist, and every module that exists is on it.

The page is a map for whoever changes the code; a map that names a module that has gone, or leaves
out one that was added, sends a newcomer the wrong way. A module may be named as ``x.py`` or, once
it has become a package, ``x/`` (and the other way round), so that a module being turned into a
package does not fail this test while the page and the code change in separate commits.
"""

from __future__ import annotations

import pathlib
import re

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[2]
_PACKAGE = _REPO / "azstoragetorch"
_PAGE = _REPO / "docs" / "architecture.rst"

# The packages whose every module and subpackage the page must name (relative to azstoragetorch/).
_MAPPED_PACKAGES = (
    "",
    "_cache",
    "_cli",
    "_client",
    "_reads",
    "datasets",
    "integrations",
    "integrations/dcp",
    "integrations/lightning",
)
# Top-level folders of the repository: a path starting with one is checked from the repository's root.
_REPO_FOLDERS = ("azstoragetorch", "tests", "benchmarks", "docs", "examples", "tools")

# A path of word segments ending in ".py" or "/": ``_urls.py``, ``integrations/lightning/``.
_PATH = re.compile(r"(?<![\w./-])((?:\w+/)*\w+(?:\.py\b|/(?![\w.])))")


# A private name in an inline literal: ``datasets._deal``, ``_find_last_checkpoints``, ``__getitems__``.
_LITERAL = re.compile(r"``([^`]+)``")
_PRIVATE_NAME = re.compile(r"(?<!\w)(_\w+)\b(?!\.py|/)")


def _named_private_names(text: str) -> set[str]:
    return {name for literal in _LITERAL.findall(text) for name in _PRIVATE_NAME.findall(literal)}


def _named_paths(text: str) -> set[str]:
    return set(_PATH.findall(text))


def _both_forms(path: str) -> tuple[str, str]:
    """``x.py`` and ``x/`` for either of them."""
    stem = path[: -len(".py")] if path.endswith(".py") else path.rstrip("/")
    return f"{stem}.py", f"{stem}/"


def _package_paths() -> set[str]:
    """Every module and folder under azstoragetorch/, relative to it; folders end in "/"."""
    paths = set()
    for path in _PACKAGE.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(_PACKAGE).as_posix()
        if path.is_dir():
            paths.add(relative + "/")
        elif path.suffix == ".py":
            paths.add(relative)
    return paths


def _exists(named: str, package_paths: set[str]) -> bool:
    """Whether ``named`` is a module or package: from the repository's root if it starts with one of
    its folders, else as the tail of a path under azstoragetorch/ (the page names ``_urls.py`` in the
    paragraph about ``_client/``)."""
    if named.split("/", 1)[0] in _REPO_FOLDERS:
        return any((_REPO / form).exists() for form in _both_forms(named))
    return any(path == form or path.endswith("/" + form) for form in _both_forms(named) for path in package_paths)


def _modules_to_map() -> list[str]:
    """The modules and subpackages of each package in _MAPPED_PACKAGES, relative to azstoragetorch/."""
    found = []
    for package in _MAPPED_PACKAGES:
        folder = _PACKAGE / package
        for child in sorted(folder.iterdir()):
            prefix = f"{package}/" if package else ""
            if child.is_dir() and (child / "__init__.py").exists():
                found.append(f"{prefix}{child.name}/")
            elif child.suffix == ".py" and child.name != "__init__.py":
                found.append(f"{prefix}{child.name}")
    return found


def _is_named(module: str, named: set[str]) -> bool:
    """Whether the page names ``module`` (relative to azstoragetorch/) by its full path or its last part."""
    for form in _both_forms(module):
        last = form.rstrip("/").rsplit("/", 1)[-1] + ("/" if form.endswith("/") else "")
        if {form, last, f"azstoragetorch/{form}"} & named:
            return True
    return False


def test_every_module_path_named_on_the_page_exists() -> None:
    package_paths = _package_paths()
    missing = sorted(
        name for name in _named_paths(_PAGE.read_text(encoding="utf-8")) if not _exists(name, package_paths)
    )
    assert not missing, f"docs/architecture.rst names modules or folders that do not exist: {missing}"


def test_every_module_of_the_mapped_packages_is_named_on_the_page() -> None:
    named = _named_paths(_PAGE.read_text(encoding="utf-8"))
    unnamed = [module for module in _modules_to_map() if not _is_named(module, named)]
    assert not unnamed, f"docs/architecture.rst does not name these modules of azstoragetorch/: {unnamed}"


def test_every_private_name_on_the_page_is_in_the_code() -> None:
    """A function or attribute the page quotes (a Lightning internal we wrap, a helper of ours) that no
    module mentions any more is a description of code that is gone."""
    source = "\n".join(path.read_text(encoding="utf-8") for path in _PACKAGE.rglob("*.py"))
    named = _named_private_names(_PAGE.read_text(encoding="utf-8"))
    gone = sorted(name for name in named if not re.search(rf"\b{re.escape(name)}\b", source))
    assert not gone, f"docs/architecture.rst quotes names that no module of azstoragetorch/ uses: {gone}"


def test_private_names_are_found_in_inline_literals_only() -> None:
    text = (
        "``datasets._deal``, ``_find_last_checkpoints``, ``_urls.py``, ``integrations/_x/``, _plain, ``__getitems__``"
    )
    assert _named_private_names(text) == {"_deal", "_find_last_checkpoints", "__getitems__"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("``_client/``", {"_client/"}),
        ("(``_urls.py``, ``_redaction.py``)", {"_urls.py", "_redaction.py"}),
        ("``azstoragetorch/_client/__init__.py`` exports", {"azstoragetorch/_client/__init__.py"}),
        ("    io.py  datasets.py   the public classes", {"io.py", "datasets.py"}),
        ("``integrations/lightning/``, one module", {"integrations/lightning/"}),
        # Not paths: options and words joined by slashes, dotted names.
        ("``azstoragetorch ls/verify/cp``, ``datasets._deal``, train/val", set()),
    ],
)
def test_named_paths_are_found_in_the_page_text(text: str, expected: set[str]) -> None:
    assert _named_paths(text) == expected


def test_a_module_and_the_package_it_became_stand_for_each_other() -> None:
    package_paths = {"integrations/dcp/", "integrations/dcp/_writer.py", "datasets.py"}
    assert _exists("dcp.py", package_paths)
    assert _exists("integrations/dcp/", package_paths)
    assert _exists("datasets/", package_paths)
    assert not _exists("_gone.py", package_paths)
    assert _is_named("integrations/dcp/", {"integrations/dcp.py"})
    assert _is_named("datasets.py", {"datasets/"})
    assert not _is_named("retry.py", {"io.py"})
