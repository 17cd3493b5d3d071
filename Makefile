# kdforge: `make demo` and `make test` work on a fresh machine with Python >= 3.10 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdforge-installed
# Without an NVIDIA GPU, pin the CPU build of torch (constraints/cpu.txt); with one, pip resolves torch normally.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_INDEX ?=
PIP_FLAGS := $(if $(HAS_GPU),,-c constraints/cpu.txt) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core of the project's 2-core CI; TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

.PHONY: setup demo test test-all lint format bench clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools

$(STAMP): pyproject.toml constraints/cpu.txt | $(BIN)/python
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdforge demo

# `make test` leaves out the tests marked heavy (minutes-long reproductions, about 8 minutes together on 2 cores);
# `make test-all` runs every test, with the onnx extra installed so that the ONNX export tests run too.
test: $(STAMP)
	$(BIN)/ruff check kdforge tests scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not heavy" $(XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -e ".[dev,onnx]"
	$(BIN)/ruff check kdforge tests scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/kdforge bench

lint: $(STAMP)
	$(BIN)/ruff check kdforge tests scripts
	$(BIN)/lint-imports
	$(BIN)/ruff format --check kdforge tests scripts

format: $(STAMP)
	$(BIN)/ruff format kdforge tests scripts
	$(BIN)/ruff check --fix kdforge tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
