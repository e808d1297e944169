# Everything runs inside a local .venv built from scratch on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The demo and the tests never touch the network; `reproduce` downloads models and datasets.
demo test: export HF_HUB_OFFLINE ?= 1
demo test: export WANDB_MODE ?= offline

.PHONY: install demo test lint format reproduce clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

## The offline quickstart: base model, fine-tune on digits and mnist5k, merge, evaluate, compare.
demo: $(BIN)/.installed
	$(BIN)/python train.py fit --config configs/quickstart/base.yaml --overwrite true
	$(BIN)/python train.py fit --config configs/quickstart/digits.yaml --overwrite true
	$(BIN)/python train.py fit --config configs/quickstart/mnist5k.yaml --overwrite true
	$(BIN)/python merge.py test --config configs/quickstart/merge.yaml
	$(BIN)/python merge.py fit --config configs/quickstart/adamerging.yaml
	$(BIN)/python merge.py test --config configs/quickstart/compare.yaml

## A benchmark (TASKS: ta8, the default, tall14 or tall20 of datamodules/tasks.py; or tasks, comma-separated):
## its reference fine-tunes GPUS at a time (one GPU each; finished tasks are skipped, interrupted ones
## resume), then AdaMerging and the method comparison of the exports.
TASKS ?= ta8
GPUS ?= 1
TRAIN_ARGS ?=
MERGE_ARGS ?=
reproduce: $(BIN)/.installed
	$(BIN)/python -m lightning_modules.reproduce --tasks $(TASKS) --gpus $(GPUS) --train-args "$(TRAIN_ARGS)" --merge-args "$(MERGE_ARGS)"

## The whole test suite (offline, CPU), after the lint: TEST_WORKERS pytest processes (pytest-xdist),
## each test file on one of them (its module fixtures built once), the longest files first.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

## One style: ruff's lint (and import order) and format check, configured in pyproject.toml.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs
