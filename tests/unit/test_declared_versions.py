"""The versions pyproject.toml declares are the versions the suites run with.

Three suites cover the declared range: ``make test`` (torch pinned at its floor), ``make test-compat``
(the newest torch and Lightning 2.6.x installable) and ``make test-floors`` (every dependency at its
floor, which tools/floors.py checks after installing). These tests keep the declarations, the
Makefile's pins and the tested range of ``azstoragetorch._compat`` saying the same thing: a bound
that no suite reaches claims support nobody tests (``torch>=2.4`` while only 2.13 was tested, and
the DCP integration uses torch's ``use_collectives``, which older releases lack).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from azstoragetorch import _compat

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What users install: the package and its lightning extra (the test tools' own bounds do not matter).
USER_REQUIREMENTS = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["lightning"]]


def _makefile_pin(variable: str) -> Version:
    makefile = (ROOT / "Makefile").read_text()
    [pin] = [line.split(":=", 1)[1].strip() for line in makefile.splitlines() if line.startswith(f"{variable} ")]
    return Version(pin.split("==", 1)[1])


def _declared(name: str) -> Requirement:
    [requirement] = [Requirement(r) for r in USER_REQUIREMENTS if Requirement(r).name == name]
    return requirement


@pytest.mark.parametrize("requirement", USER_REQUIREMENTS)
def test_the_tested_environment_satisfies_each_declared_requirement(requirement: str) -> None:
    # Holds in all three suites' environments (make setup, test-compat and test-floors).
    parsed = Requirement(requirement)
    installed = Version(metadata.version(parsed.name))

    assert parsed.specifier.contains(installed, prereleases=True), f"{requirement}, but tests run with {installed}"


def test_the_torch_floor_is_the_release_the_set_up_pins() -> None:
    [floor] = [Version(spec.version) for spec in _declared("torch").specifier if spec.operator == ">="]

    assert _makefile_pin("TORCH_PIN").release[: len(floor.release)] == floor.release


@pytest.mark.parametrize("requirement", USER_REQUIREMENTS)
def test_every_dependency_declares_a_floor_and_only_lightning_a_cap(requirement: str) -> None:
    # A floor is what tools/floors.py installs for make test-floors; a cap blocks users' newer
    # releases, so only Lightning, whose internals we wrap, has one.
    operators = sorted(spec.operator for spec in Requirement(requirement).specifier)

    assert operators == (["<", ">="] if Requirement(requirement).name == "lightning" else [">="])


def test_the_tested_torch_range_runs_from_the_pinned_floor_to_the_compat_pin() -> None:
    # _compat's range is what the untested-version warning and the docs state.
    assert _compat.TESTED_TORCH[0] == _makefile_pin("TORCH_PIN").release[:2]
    assert _compat.TESTED_TORCH[-1] == _makefile_pin("COMPAT_TORCH").release[:2]
    assert _declared("torch").specifier.contains(_makefile_pin("COMPAT_TORCH"))


def test_the_compat_lightning_is_the_tested_minor_release_inside_the_declared_range() -> None:
    compat = _makefile_pin("COMPAT_LIGHTNING")

    assert compat.release[:2] in _compat.TESTED_LIGHTNING
    assert _declared("lightning").specifier.contains(compat)


def test_lightning_is_capped_at_the_tested_minor_release() -> None:
    [lightning] = [Requirement(r) for r in PROJECT["optional-dependencies"]["lightning"] if r.startswith("lightning")]
    major, minor = Version(metadata.version("lightning")).release[:2]

    assert [str(spec) for spec in lightning.specifier if spec.operator == "<"] == [f"<{major}.{minor + 1}"]


def test_the_python_floor_is_the_tested_python() -> None:
    assert PROJECT["requires-python"] == f">={sys.version_info.major}.{sys.version_info.minor}"
