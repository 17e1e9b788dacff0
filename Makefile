# One-command set-up: every target installs into .venv first (only once).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the venv has none: the CPU build that this machine's pip finds for 2.13.0, or your own.
# GPU users: install your CUDA torch into the venv first (or set TORCH=...), it is kept.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install demo test test-all lint format bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -e ".[dev,math,plot,wandb,trackio]"
	touch $@

install: $(VENV)/.installed

# The offline demo: a tiny 4-bit model + LoRA learns held-out sums with GRPO on the CPU (~2 minutes).
demo: install
	$(PY) recipes/prepare_demo.py outputs/demo
	$(PY) recipes/deepseek_math_style.py --config recipes/configs/tiny-cpu.yaml

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# One GRPO step side by side with trl.GRPOTrainer, with and without prefix sharing (~5 minutes; benchmarks/README.md).
bench: install
	$(PY) benchmarks/bench_step.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
