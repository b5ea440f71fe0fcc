# Two commands do everything from a fresh clone:
#   make demo   set up, then run the whole pipeline on the bundled demo data (CPU, minutes; replaces runs/demo)
#   make test   set up, then run every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned to the CPU wheel that lies on disk here; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup browser demo test test-fast test-interop lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# tests/test_web_browser.py drives Debian's Chromium through Playwright (no browser download). Installed here,
# with a CJK font for the screenshot, when it is missing and apt-get can install it (as root, or with sudo that
# asks no password); otherwise that test talks to the page through Streamlit's own server protocol instead.
CHROMIUM ?= $(or $(MINIMIND_CHROMIUM),/usr/bin/chromium)
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then \
	    as_root=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    $$as_root apt-get update -qq && \
	    $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei; \
	else \
	    echo "no Chromium at $(CHROMIUM) and no apt-get/root to install it: the web UI test runs without a browser"; \
	fi

demo: setup
	$(BIN)/minimind demo --out runs/demo --overwrite

# The suite runs in TEST_WORKERS processes (pytest-xdist; each gets its share of the cores, tests/conftest.py), a
# test handed to whichever is free (worksteal); TEST_WORKERS=0 runs it in this one process.
# --durations=20: the 20 slowest tests, so the suite's budget stays visible
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal
test: setup browser
	$(PYTEST) --durations=20

test-fast: setup
	$(PYTEST) -m "not slow"

# GGUF exports run in llama.cpp (the llamacpp extra compiles it, ~10 minutes on 2 cores); the interop tests
# must run here, so a skip (llama_cpp missing) fails the target
test-interop: setup
	$(BIN)/pip install --quiet -e ".[llamacpp]"
	MINIMIND_REQUIRE_INTEROP=1 $(BIN)/python -m pytest -q -m interop

lint: setup
	$(BIN)/ruff check minimind tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
