# Entry points. Every target that needs the machine prepared runs `setup` first (idempotent,
# seconds when already done). Run as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck unit netns demo plugin bench clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# The whole suite: lint, types, then every pytest marker but `vm` (see `make vm-test`).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	bash scripts/pytest.sh -m "not vm" $(PYTEST_ARGS)

unit: setup
	bash scripts/pytest.sh -m "not netns and not vm and not testbed" $(PYTEST_ARGS)

netns: setup
	bash scripts/pytest.sh -m netns $(PYTEST_ARGS)

# Until the demo issue lands: a small end-to-end show of the redirection backend.
demo: setup
	$(PY) -m testbed.demo $(DEMO_ARGS)

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
