# Course Assistant: `make dev` runs the service, `make test` checks it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help dev test lint typecheck pytest bench fake-openai clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install when the dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

dev: $(VENV)/.installed ## start PostgreSQL, Redis, the API and a worker with the demo course
	$(BIN)/python -m workers dev

test: lint typecheck pytest ## ruff, mypy and the test suite

lint: $(VENV)/.installed ## ruff
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed ## mypy (strict)
	$(BIN)/mypy

pytest: $(VENV)/.installed ## the test suite on real PostgreSQL, Redis and the fake OpenAI server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed ## benchmarks (tables printed, JSON in bench/results/)
	$(BIN)/python -m bench.reindex --embeddings hashed
	$(BIN)/python -m bench.reindex --embeddings seeded
	$(BIN)/python -m bench.service

fake-openai: $(VENV)/.installed ## run the fake OpenAI-compatible server on port 8089
	$(BIN)/python -m rag.fake_openai --port 8089

clean: ## remove the virtualenv and the embedded services' data
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache
