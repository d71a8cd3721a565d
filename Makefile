# stagewise: `make run` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default pin is a CPU wheel
# on machines that carry it locally and PyPI's CUDA build elsewhere on Linux; override it for a
# specific CUDA index, e.g. make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Test processes: each module runs whole on one of them, the longest first (tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test test-fast repro bench clean-outputs

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,lmeval]"
	test -d .dvc || $(BIN)/dvc init -q $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m flows.pipeline

# --durations: the slowest tests in every log, for whoever trims the suite
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

repro: $(BIN)/.installed
	$(BIN)/dvc repro

bench: $(BIN)/.installed
	bash bench/e2e.sh
