# One command installs and runs the stack (`make run`), one runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV := .venv-checkov/bin/checkov
SCHEMATHESIS := .venv-schemathesis/bin/st
LITELLM := .venv-litellm/bin/litellm

.PHONY: install run test lint proto check-proto bench-llm

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
	$(BIN)/ruff check libs services tests scripts bench
	$(BIN)/ruff format --check libs services tests scripts bench
	$(BIN)/mypy libs services

# Regenerate libs/altan/v1 from proto/ (the generated code is checked in; tests fail when it drifts).
proto: install
	$(BIN)/python scripts/gen_proto.py
