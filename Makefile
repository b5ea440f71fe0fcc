# Two commands do everything from a fresh clone:
#   make demo   set up, then run the whole pipeline on the bundled demo data (CPU, minutes; replaces runs/demo)
#   make test   set up, then run every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned to the CPU wheel that lies on disk here; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast test-interop lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/minimind demo --out runs/demo --overwrite

# --durations=20: the 20 slowest tests, so the suite's budget stays visible
test: setup
	$(BIN)/python -m pytest -q --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# GGUF exports run in llama.cpp (the llamacpp extra compiles it, ~10 minutes on 2 cores); the interop tests
# must run here, so a skip (llama_cpp missing) fails the target
test-interop: setup
	$(BIN)/pip install --quiet -e ".[llamacpp]"
	MINIMIND_REQUIRE_INTEROP=1 $(BIN)/python -m pytest -q -m interop

lint: setup
	$(BIN)/ruff check minimind tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
