# Set-up, tests and the demo. `make test` and `make demo` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here, not resolved: the pinned CPU build lies on the machine's disk, while an
# unpinned resolve downloads a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
AZURITE := tools/azurite/node_modules/.bin/azurite-blob

.PHONY: setup test unit lint docs demo bench clean test-compat test-floors

setup: $(VENV)/.installed $(AZURITE)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[lightning,test,bench]'
	touch $@

$(AZURITE): tools/azurite/package.json tools/azurite/package-lock.json
	npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error
	touch $@

# The compatibility suite (`make test-compat`, not part of `make test`): the whole pytest suite in a
# second venv with the newest torch and Lightning 2.6.x installable here. torch's CUDA builds need
# their nvidia-* wheels (about 2.3 GB, most of them on this machine's disk) even to import on a CPU:
# without them `import torch` fails on libcudnn.so, so they are installed as torch declares them.
# Raise the pins when a newer release is installable, and keep the tested range in
# azstoragetorch/_compat.py (TESTED_TORCH, TESTED_LIGHTNING) in step.
COMPAT_VENV := .venv-compat
COMPAT_TORCH := torch==2.14.1
COMPAT_LIGHTNING := lightning==2.6.6

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	nice $(COMPAT_VENV)/bin/python -m pip install --quiet $(COMPAT_TORCH)
	nice $(COMPAT_VENV)/bin/python -m pip install --quiet -e '.[lightning,test]' $(COMPAT_TORCH) $(COMPAT_LIGHTNING)
	touch $@

test-compat: $(COMPAT_VENV)/.installed $(AZURITE)
	$(COMPAT_VENV)/bin/python -c "import torch, lightning; print('torch', torch.__version__, '/ lightning', lightning.__version__)"
	nice $(COMPAT_VENV)/bin/pytest -p no:cacheprovider

# The floors suite (`make test-floors`): the whole pytest suite with every dependency pyproject.toml
# declares installed at its floor (tools/floors.py writes them as pip constraints and checks them).
FLOORS_VENV := .venv-floors

$(FLOORS_VENV)/.installed: pyproject.toml Makefile tools/floors.py
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS_VENV)/bin/python tools/floors.py > $(FLOORS_VENV)/constraints.txt
	nice $(FLOORS_VENV)/bin/python -m pip install --quiet $(TORCH_PIN)
	nice $(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/constraints.txt -e '.[lightning,test]'
	$(FLOORS_VENV)/bin/python tools/floors.py --check
	touch $@

test-floors: $(FLOORS_VENV)/.installed $(AZURITE)
	nice $(FLOORS_VENV)/bin/pytest -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check azstoragetorch tests examples benchmarks
	$(VENV)/bin/ruff format --check azstoragetorch tests examples benchmarks
	$(VENV)/bin/mypy

docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

test: setup lint docs
	$(VENV)/bin/pytest

# The unit tests alone (tests/unit), for the edit-and-test loop: no emulator and no network, so they
# need only the venv. `make test` is still the whole suite and what a change must pass.
unit: $(VENV)/.installed
	$(VENV)/bin/pytest tests/unit

demo: setup
	$(PY) examples/demo.py

bench: setup
	$(PY) benchmarks/bench_checkpoint.py
	$(PY) benchmarks/bench_datasets.py
	$(PY) benchmarks/bench_lightning.py
	$(PY) benchmarks/bench_lightning_sharded.py
	$(PY) benchmarks/bench_dcp.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_entries.py
	$(PY) benchmarks/bench_stats.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(FLOORS_VENV) tools/azurite/node_modules docs/_build .pytest_cache .mypy_cache .ruff_cache
