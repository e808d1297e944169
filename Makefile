# Everything runs inside a local .venv built from scratch on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test clean

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

## The whole test suite (offline, CPU).
test: $(BIN)/.installed
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) outputs
