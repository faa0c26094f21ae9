# CLL TME Atlas — the two commands:
#   make demo   install, simulate the demo cohort, build the atlas, serve the explorer
#   make test   install (incl. headless Chromium for browser tests) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO ?= demo
HOST ?= 127.0.0.1
PORT ?= 8050
PYTEST_ARGS ?=

.PHONY: install demo demo-data demo-atlas serve test lint format browser-deps bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# CPU torch first: an unpinned torch would pull gigabytes of CUDA packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -e ".[dev]"
	touch $@

demo-data: install
	$(VENV)/bin/tme-atlas simulate --out $(DEMO)/data --seed 0

demo-atlas: demo-data
	$(VENV)/bin/tme-atlas build $(DEMO)/data/samplesheet.csv --out $(DEMO)/atlas --resume

demo: demo-atlas
	$(VENV)/bin/tme-atlas serve $(DEMO)/atlas --host $(HOST) --port $(PORT)

serve: install
	$(VENV)/bin/tme-atlas serve $(DEMO)/atlas --host $(HOST) --port $(PORT)

browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "warning: chromium/chromedriver missing and not root; browser tests will be skipped"; fi; \
	fi

test: install browser-deps
	$(VENV)/bin/ruff check tme_atlas preprocessing atlas app references tests benchmarks
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=2 \
	  $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check tme_atlas preprocessing atlas app references tests benchmarks
	$(VENV)/bin/ruff format --check tme_atlas preprocessing atlas app references tests benchmarks

format: install
	$(VENV)/bin/ruff format tme_atlas preprocessing atlas app references tests benchmarks
	$(VENV)/bin/ruff check --fix tme_atlas preprocessing atlas app references tests benchmarks

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(DEMO) .pytest_cache test-artifacts
