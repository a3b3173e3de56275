"""The versions pyproject.toml declares are the versions the suite runs with.

A lower bound below what is installed claims support nobody tests (``torch>=2.4`` while only 2.13
was tested, and the DCP integration uses torch's ``use_collectives``, which older releases lack);
Lightning, whose internals the integration wraps, is capped at the tested minor release.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

PROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
# What users install: the package and its lightning extra (the test tools' own bounds do not matter).
USER_REQUIREMENTS = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["lightning"]]


@pytest.mark.parametrize("requirement", USER_REQUIREMENTS)
def test_the_tested_environment_satisfies_each_declared_requirement(requirement: str) -> None:
    # The bounds were raised to the releases `make setup` installed when they were last checked; a
    # fresh set-up may install newer releases, which still satisfy them.
    parsed = Requirement(requirement)
    installed = Version(metadata.version(parsed.name))

    assert parsed.specifier.contains(installed, prereleases=True), f"{requirement}, but tests run with {installed}"


def test_the_torch_floor_is_the_release_the_set_up_pins() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    [pin] = [line.split(":=", 1)[1].strip() for line in makefile.splitlines() if line.startswith("TORCH_PIN")]
    [torch] = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch"]
    [floor] = [Version(spec.version) for spec in torch.specifier if spec.operator == ">="]

    assert Version(pin.split("==", 1)[1]).release[: len(floor.release)] == floor.release


def test_lightning_is_capped_at_the_tested_minor_release() -> None:
    [lightning] = [Requirement(r) for r in PROJECT["optional-dependencies"]["lightning"] if r.startswith("lightning")]
    major, minor = Version(metadata.version("lightning")).release[:2]

    assert [str(spec) for spec in lightning.specifier if spec.operator == "<"] == [f"<{major}.{minor + 1}"]


def test_the_python_floor_is_the_tested_python() -> None:
    assert PROJECT["requires-python"] == f">={sys.version_info.major}.{sys.version_info.minor}"
