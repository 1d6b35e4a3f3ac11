# One command installs and runs the stack (`make run`), one runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV := .venv-checkov/bin/checkov
SCHEMATHESIS := .venv-schemathesis/bin/st

.PHONY: install run test lint proto check-proto

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

test: install $(CHECKOV) $(SCHEMATHESIS) lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check libs services tests scripts bench
	$(BIN)/ruff format --check libs services tests scripts bench
	$(BIN)/mypy libs services

# Regenerate libs/altan/v1 from proto/ (the generated code is checked in; tests fail when it drifts).
proto: install
	$(BIN)/python scripts/gen_proto.py
