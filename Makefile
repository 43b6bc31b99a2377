PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: install test lint format bench ci

install:
	$(PYTHON) -m pip install -e '.[dev]'

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	$(PYTHON) -m mypy

format:
	$(PYTHON) -m ruff check --fix src tests benchmarks
	$(PYTHON) -m ruff format src tests benchmarks

# The targets on the workers users run (two pairs of runs, for the range), then the per-stage
# table from the instrumented workers, whose timing wrappers cost CPU of their own.
bench:
	$(PYTHON) -m benchmarks.pipeline --plain --repeat 2 --skip-imaging
	$(PYTHON) -m benchmarks.pipeline

ci:
	.ci/run
