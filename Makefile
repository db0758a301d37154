# Nova Email: every target that needs the virtualenv depends on `install`, so each works on a fresh clone.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install migrate test test-fast lint format typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

migrate: install
	$(BIN)/nova-email migrate

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not processes" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check nova_email brokers tests bench
	$(BIN)/ruff format --check nova_email brokers tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix nova_email brokers tests bench
	$(BIN)/ruff format nova_email brokers tests bench

typecheck: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The four processors: all in one command (monolithic), or one each. Extra dramatiq options: ARGS="--processes 2".
ARGS ?=
.PHONY: run-all run-webhooks run-backfill run-threads run-completion
run-all: migrate
	$(BIN)/nova-email run all $(ARGS)
run-webhooks: migrate
	$(BIN)/nova-email run webhooks $(ARGS)
run-backfill: migrate
	$(BIN)/nova-email run backfill $(ARGS)
run-threads: migrate
	$(BIN)/nova-email run threads $(ARGS)
run-completion: migrate
	$(BIN)/nova-email run completion $(ARGS)

# The whole service on a generated mailbox: embedded PostgreSQL, Nylas simulator, all four processors.
.PHONY: demo
demo: install
	$(BIN)/nova-email demo $(ARGS)

# Benchmarks print their figures as ratios against peers measured in the same run (see each file's docstring).
.PHONY: bench bench-broker bench-backfill bench-intake bench-burst
bench: bench-broker bench-backfill bench-intake bench-burst
# The broker benchmark measures procrastinate too, so it installs the bench extra first.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@
bench-broker: install $(VENV)/.bench-installed
	$(BIN)/python bench/broker.py
	$(BIN)/python bench/backlog.py
bench-backfill: install
	$(BIN)/python bench/backfill.py
bench-intake: install
	$(BIN)/python bench/intake.py
bench-burst: install
	$(BIN)/python bench/webhook_burst.py
