# sae_core: every command creates (or reuses) the local virtualenv .venv and installs the package.
#   make demo   - the whole pipeline on the offline default model (SmolLM2) and the default corpus
#   make test   - lint + the test suite (unit tier on a tiny random model, integration on SmolLM2)
#   make bench  - benchmarks against SAELens; writes bench/results/*.json and the README table
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sae_core-installed
SD_VENV ?= .venv-saedashboard
SD_STAMP := $(SD_VENV)/.installed

# Offline by default: no Hugging Face hub, no wandb.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint bench clean-outputs

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo

lint: $(STAMP)
	$(PY) -m ruff check sae_core scripts bench tests

test: lint
	$(PY) -m pytest -q --durations=15

# SAEDashboard, the browser's peer, pins transformer-lens<3: its own virtualenv, beside ours.
$(SD_STAMP): bench/requirements-saedashboard.txt constraints.txt
	test -x $(SD_VENV)/bin/python || $(PYTHON) -m venv $(SD_VENV)
	$(SD_VENV)/bin/pip install --quiet -c constraints.txt -r bench/requirements-saedashboard.txt
	$(SD_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio
	touch $(SD_STAMP)

bench: $(STAMP) $(SD_STAMP)
	$(PY) -m bench.run_all

clean-outputs:
	rm -rf outputs
