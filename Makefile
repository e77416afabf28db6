# Quick start:  make demo   |   make test
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch first: the pinned CPU build lies on this project's machines (an unpinned torch
# would pull several GB of CUDA wheels)
TORCH ?= torch==2.13.0

.PHONY: install install-dev demo test test-fast lint clean

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"

# Builds the toy base on first use (cached in .cache/), then runs OPD and CaOPD and prints
# the base / OPD / CaOPD table.
demo: install
	$(PYTHON) train.py -m experiment=opd,caopd hydra.sweep.dir=outputs/demo
	$(PYTHON) -m lightning_caopd.report outputs/demo

test: install-dev
	$(PYTHON) -m pytest -q

test-fast: install-dev
	$(PYTHON) -m pytest -q -m "not slow"

clean:
	rm -rf outputs multirun logs .pytest_cache
