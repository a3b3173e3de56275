"""Guards for every torch and Lightning name azstoragetorch relies on beyond their public API, and
the warning about an untested torch or Lightning.

Each entry of ``azstoragetorch._compat`` is checked against the installed releases: a name that
moved, or a signature that changed, fails here naming the symbol, the version and the code that
uses it, before it fails somewhere inside a save.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

from azstoragetorch import _compat
from azstoragetorch._compat import INSTANCE_ATTRIBUTES, OVERRIDDEN, PRIVATE_NAMES, Reliance
from azstoragetorch.exceptions import UntestedVersionWarning

PACKAGE = Path(_compat.__file__).parent


def _lookup(entry: Reliance) -> Any:
    try:
        found: Any = importlib.import_module(entry.module)
    except ImportError as error:
        pytest.fail(f"{_where(entry)}: module {entry.module} is gone ({error}). Used by {entry.used_by}.")
    for part in filter(None, entry.name.split(".")):
        if not hasattr(found, part):
            pytest.fail(f"{_where(entry)}: {entry.symbol} is gone. Used by {entry.used_by}.")
        found = getattr(found, part)
    return found


def _where(entry: Reliance) -> str:
    return f"{entry.package} {_compat.installed_version(entry.package)}"


@pytest.mark.parametrize("entry", PRIVATE_NAMES + OVERRIDDEN, ids=lambda entry: entry.symbol)
def test_each_name_relied_on_exists_with_the_parameters_we_use(entry: Reliance) -> None:
    found = _lookup(entry)
    if entry.parameters is None:
        return
    # The original, should one of our own wrappers (installed by an earlier test) sit in front of it.
    parameters = tuple(inspect.signature(inspect.unwrap(found)).parameters)

    assert parameters == entry.parameters, (
        f"{_where(entry)}: {entry.symbol} now takes {parameters}, not {entry.parameters}. "
        f"Used by {entry.used_by}: check that code against the new signature, then update azstoragetorch/_compat.py."
    )


@pytest.mark.parametrize(
    ("owner", "attributes"),
    INSTANCE_ATTRIBUTES.items(),
    ids=[f"{module}.{name}" for _, module, name in INSTANCE_ATTRIBUTES],
)
def test_each_instance_attribute_relied_on_is_set_by_the_constructor(
    owner: tuple[str, str, str], attributes: tuple[str, ...], tmp_path: Any
) -> None:
    package, module, name = owner
    cls = _lookup(Reliance(package, module, name, "the attributes below"))
    instance = cls(None) if package == "lightning" else cls(tmp_path)
    missing = [attribute for attribute in attributes if not hasattr(instance, attribute)]

    assert not missing, (
        f"{package} {_compat.installed_version(package)}: {module}.{name} instances no longer have {missing}; "
        "see azstoragetorch/_compat.py for the code that uses them."
    )


def test_a_moved_name_fails_its_guard_naming_the_symbol_and_the_version() -> None:
    moved = Reliance("torch", "torch.distributed.checkpoint.filesystem", "_NoSuchName", "nothing (a test)")

    with pytest.raises(pytest.fail.Exception) as failure:
        _lookup(moved)

    message = str(failure.value)
    assert "torch.distributed.checkpoint.filesystem._NoSuchName" in message
    assert f"torch {_compat.installed_version('torch')}" in message


def test_a_changed_signature_fails_its_guard() -> None:
    changed = Reliance("torch", "torch.distributed.checkpoint.filesystem", "FileSystemWriter.finish", "x", ("self",))

    with pytest.raises(AssertionError, match=r"FileSystemWriter\.finish now takes \('self', 'metadata', 'results'\)"):
        test_each_name_relied_on_exists_with_the_parameters_we_use(changed)


def _private_names_in_the_source() -> set[str]:
    """Private torch and Lightning names the package's code imports or reaches at run time: names
    imported from a private module or starting with ``_``, ``<imported>._name`` attributes, and
    ``(<imported>, "_name")`` pairs (how the Lightning wrappers name what they replace). Imports
    under ``if TYPE_CHECKING:`` are annotations only and left out."""
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for statement in block.body
            for node in ast.walk(statement)
        }
        imported: dict[str, str] = {}  # local name -> full symbol, for torch and Lightning names
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "lightning"):
                private_module = any(part.startswith("_") for part in node.module.split("."))
                for alias in node.names:
                    imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    if private_module or alias.name.startswith("_"):
                        found.add(f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("torch", "lightning") and alias.asname:
                        imported[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = _symbol(node.value, imported)
                if owner is not None:
                    found.add(f"{owner}.{node.attr}")
            elif isinstance(node, ast.Tuple | ast.Call):
                items = node.elts if isinstance(node, ast.Tuple) else node.args
                for first, second in itertools.pairwise(items):
                    owner = _symbol(first, imported)
                    if owner is not None and isinstance(second, ast.Constant) and str(second.value).startswith("_"):
                        found.add(f"{owner}.{second.value}")
    return found


def _symbol(node: ast.expr, imported: dict[str, str]) -> str | None:
    """The full name of ``a`` or ``a.b.c`` when ``a`` is an imported torch or Lightning name."""
    if isinstance(node, ast.Name):
        return imported.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _symbol(node.value, imported)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _listed(symbol: str) -> bool:
    # Listed as it is, or through a listed attribute of it (a private class by the method we wrap).
    return any(entry.symbol == symbol or entry.symbol.startswith(symbol + ".") for entry in PRIVATE_NAMES)


def test_every_private_name_the_package_uses_is_listed() -> None:
    unlisted = sorted(symbol for symbol in _private_names_in_the_source() if not _listed(symbol))

    assert unlisted == [], f"list these in azstoragetorch/_compat.py PRIVATE_NAMES (with what uses them): {unlisted}"


def test_the_source_scan_sees_each_kind_of_use() -> None:
    # The scan above is what keeps the list complete; it must see imports, attributes and wrapper pairs.
    found = _private_names_in_the_source()

    assert "torch.distributed.checkpoint.filesystem._StoragePrefix" in found
    assert "lightning.pytorch.trainer.connectors.callback_connector._CallbackConnector" in found
    assert "lightning.fabric.utilities.cloud_io._is_object_storage" in found
    assert "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint._find_last_checkpoints" in found
    assert not any("_extension" in symbol for symbol in found)  # imported for annotations only


# -- the warning about an untested version ------------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compat, "_warned", set())


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.14.1+cu130", (2, 14)), ("2.13.0+cpu", (2, 13)), ("2.15.0a0+git1234", (2, 15)), ("3.0", (3, 0)), ("x", None)],
)
def test_release_reads_major_and_minor(version: str, expected: tuple[int, int] | None) -> None:
    assert _compat.release(version) == expected


@pytest.mark.parametrize("package", ["torch", "lightning"])
def test_an_untested_release_warns_once_naming_both_versions(
    package: str, fresh_warnings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda distribution: "9.1.0")

    with pytest.warns(UntestedVersionWarning) as caught:
        _compat.warn_if_untested(package)
        _compat.warn_if_untested(package)

    [warning] = caught
    message = str(warning.message)
    assert f"not with {package} 9.1.0" in message
    tested = _compat.TESTED_TORCH if package == "torch" else _compat.TESTED_LIGHTNING
    assert all(f"{major}.{minor}" in message for major, minor in tested)
    assert issubclass(UntestedVersionWarning, UserWarning)  # a warning: users may still try


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.14.1+cu130", "2.14.0"])
def test_a_tested_torch_does_not_warn(version: str, fresh_warnings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda distribution: version)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.warn_if_untested("torch")


def test_the_installed_releases_are_tested_ones() -> None:
    # So that the suite itself runs without the warning (make test and make test-compat).
    assert _compat.release(_compat.installed_version("torch") or "") in _compat.TESTED_TORCH
    assert _compat.release(_compat.installed_version("lightning") or "") in _compat.TESTED_LIGHTNING


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("azstoragetorch.integrations.dcp", "torch"),
        ("azstoragetorch.datasets", "torch"),
        ("azstoragetorch.integrations.lightning", "torch"),
        ("azstoragetorch.integrations.lightning", "lightning"),
    ],
)
def test_importing_a_module_that_uses_it_warns_about_an_untested_release(module: str, package: str) -> None:
    # In a fresh process, as a user's import would: the tested range is moved away from what is installed.
    code = textwrap.dedent(
        f"""
        import warnings
        from azstoragetorch import _compat
        _compat.TESTED_{package.upper()} = ((0, 1),)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import {module}
        print([str(w.message) for w in caught if w.category.__name__ == "UntestedVersionWarning"])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert f"tested with {package} 0.1, not with {package} {_compat.installed_version(package)}" in result.stdout
