"""The dependency floors pyproject.toml declares, as pip constraints, for `make test-floors`.

python tools/floors.py            # print "name==floor" for each dependency and the lightning extra
python tools/floors.py --check    # exit 1 unless each is installed at exactly its floor
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floors() -> dict[str, str]:
    """Each user-facing requirement's ``>=`` bound, by distribution name."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["lightning"]]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        floor = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
        if name is None or floor is None:
            raise SystemExit(f"pyproject.toml: {requirement!r} declares no floor (>=)")
        found[name[0]] = floor[1]
    return found


def _release(version: str) -> tuple[int, ...]:
    numbers = [int(part) for part in re.split(r"[.+]", version.split("+")[0]) if part.isdigit()]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        wrong = {
            name: metadata.version(name)
            for name, floor in floors().items()
            if _release(metadata.version(name)) != _release(floor)
        }
        for name, installed in wrong.items():
            print(f"{name} {installed} is installed, not its floor {floors()[name]}", file=sys.stderr)
        return 1 if wrong else 0
    print("\n".join(f"{name}=={floor}" for name, floor in floors().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
