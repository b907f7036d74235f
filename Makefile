# sensorcast: `make run` serves on 127.0.0.1:8000; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default model compiled with mypyc (app/models/compiled.py): rebuilt when its sources change.
COMPILED := app/models/_compiled/manifest.json

.PHONY: run test check lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

$(COMPILED): app/models/ridge.py app/models/alarms.py app/models/compiled.py app/models/build.py | $(STAMP)
	$(BIN)/python -m app.models.build

run: $(STAMP) $(COMPILED)
	$(BIN)/sensorcast serve

test: $(STAMP) $(COMPILED)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff format --check app tests bench conftest.py
	$(BIN)/ruff check app tests bench conftest.py
	$(BIN)/mypy

check: lint test

bench: $(STAMP) $(COMPILED)
	$(BIN)/sensorcast bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache app/models/_compiled
