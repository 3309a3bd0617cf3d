# durachat: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==0.13.9

install: $(UV) ## Create .venv and install the locked dependencies (dev tools included)
	$(UV) sync --frozen --quiet

tests/js/node_modules: tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch tests/js/node_modules

# The bench's Node peer; without npm the bench runs without it and says so in its report.
benchmarks/peers/resumable/node_modules: benchmarks/peers/resumable/package-lock.json
	@if command -v npm >/dev/null; then \
		cd benchmarks/peers/resumable && npm ci --no-audit --no-fund --loglevel=error && touch node_modules; \
	else \
		echo "npm not found: make bench runs without the resumable (Node) peer" >&2; \
	fi

run: install ## Start the whole dev stack (Temporal, Postgres, Redis, worker, API)
	$(BIN)/durachat dev

test: install tests/js/node_modules ## Run the test suite against real embedded services
	$(BIN)/pytest

lint: install ## Lint, check formatting and type-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install ## Format the code and apply safe lint fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install benchmarks/peers/resumable/node_modules ## Latency, load, streams and recovery, then a table of point 1's targets; BENCH_ARGS="--quick" (minutes), "--only load,streams", "--help"
	$(BIN)/python -m benchmarks.suite $(BENCH_ARGS)

bench-latency: install benchmarks/peers/resumable/node_modules ## Turn latency and stop-to-abort through the API against a direct provider stream and two peer servers
	$(BIN)/python -m benchmarks.turn_latency

bench-load: install ## Open-loop load on POST /v1/chats, stepped up until the stack saturates
	$(BIN)/python -m benchmarks.load

bench-streams: install ## 1,000 live streams at 10 tokens/s through one api and one worker
	$(BIN)/python -m benchmarks.many_streams

bench-recovery: install ## Time from a worker's SIGKILL to the next token on the open stream
	$(BIN)/python -m benchmarks.recovery

clean: ## Remove the virtual environments and local data
	rm -rf $(TOOLS) $(VENV) .durachat tests/js/node_modules benchmarks/peers/resumable/node_modules

.PHONY: help install run test lint format bench bench-latency bench-load bench-streams bench-recovery clean
