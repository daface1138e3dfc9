# liverseg — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The TensorFlow extra: cpu (tensorflow-cpu) or, on a CUDA machine, gpu (make TF_EXTRA=gpu venv).
TF_EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(TF_EXTRA)-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PORT ?= 5001
export MLFLOW_TRACKING_URI ?= sqlite:///mlruns/mlflow.db
# TensorFlow's oneDNN/C++ banner lines are noise for a user.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.DEFAULT_GOAL := help
.PHONY: help venv system-deps run test test-fast lint format ui serve bench clean compare plots ui-check stack-up stack-down

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,$(TF_EXTRA)]'
	$(BIN)/python -m pip check
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The offline page template of `dvc plots show` (.dvc/config), Vega inlined from a pinned package.
PLOTS_PAGE := .dvc/plots/offline.html
$(PLOTS_PAGE): $(STAMP)
	$(BIN)/python -m liverseg.plots_page $@

venv: $(STAMP) $(PLOTS_PAGE) ## create .venv with the pinned dependencies and liverseg (editable)

run: $(STAMP) $(PLOTS_PAGE) ## set up and run the whole pipeline (dvc repro) on the default data
	source $(BIN)/activate && dvc repro
	source $(BIN)/activate && dvc metrics show

system-deps: ## install the Debian packages the tests need, if missing (sudo when not root)
	@bash scripts/system-deps.sh

test: system-deps $(STAMP) $(PLOTS_PAGE) ## set up and run the whole test suite (incl. the slow end-to-end tests)
	$(BIN)/python -m pytest

test-fast: system-deps $(STAMP) $(PLOTS_PAGE) ## the unit tests only (no end-to-end runs)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check src tests benchmarks deploy
	$(BIN)/ruff format --check src tests benchmarks deploy
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's formatting and import sorting
	$(BIN)/ruff check --fix src tests benchmarks deploy
	$(BIN)/ruff format src tests benchmarks deploy

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 over the local store
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) -h 127.0.0.1 -p 5000

serve: $(STAMP) ## serve the registry's champion on http://127.0.0.1:5001 (PORT=...)
	source $(BIN)/activate && mlflow models serve -m "models:/liver-unet@champion" \
		--env-manager local -h 127.0.0.1 -p $(PORT)

compare: $(STAMP) ## dvc exp show cut to CV Dice, test Dice, HD95, lr, batch, GFLOP; the params that differ
	source $(BIN)/activate && dvc exp show --csv | python -m liverseg.compare

plots: $(STAMP) $(PLOTS_PAGE) ## dvc plots show (offline page): validation Dice and loss, a line per fold
	source $(BIN)/activate && dvc plots show

ui-check: $(STAMP) $(PLOTS_PAGE) ## the MLflow UI in headless Chromium on a tiny pipeline (screenshots in docs/)
	LIVERSEG_SCREENSHOTS=docs $(BIN)/python -m pytest tests/test_ui_browser.py -v -s

bench: $(STAMP) ## run the benchmarks (figures in benchmarks/README.md)
	source $(BIN)/activate && bash benchmarks/run_all.sh

stack-up: $(STAMP) ## PostgreSQL, S3 store and mlflow server (basic-auth) on 127.0.0.1, data in .stack/
	$(BIN)/python deploy/stack.py up --dir .stack

stack-down: $(STAMP) ## stop what stack-up started (by PID); the data stays in .stack/
	$(BIN)/python deploy/stack.py down --dir .stack

clean: ## remove the pipeline's outputs (not the MLflow store, not the venv)
	rm -rf data models reports optuna
