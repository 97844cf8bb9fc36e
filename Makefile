PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/winnow serve $(MODEL)

test: $(STAMP)
	$(BIN)/ruff check winnow tests bench
	$(BIN)/ruff format --check winnow tests bench
	$(BIN)/mypy winnow
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
