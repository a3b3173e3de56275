# Set-up, tests and the demo. `make test` and `make demo` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here, not resolved: the pinned CPU build lies on the machine's disk, while an
# unpinned resolve downloads a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
AZURITE := tools/azurite/node_modules/.bin/azurite-blob

.PHONY: setup test lint docs demo bench clean

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

lint: setup
	$(VENV)/bin/ruff check azstoragetorch tests examples benchmarks
	$(VENV)/bin/ruff format --check azstoragetorch tests examples benchmarks
	$(VENV)/bin/mypy

docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

test: setup lint docs
	$(VENV)/bin/pytest

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
	rm -rf $(VENV) tools/azurite/node_modules docs/_build .pytest_cache .mypy_cache .ruff_cache
