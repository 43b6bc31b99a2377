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

bench:
	$(PYTHON) benchmarks/pipeline.py

ci:
	.ci/run
