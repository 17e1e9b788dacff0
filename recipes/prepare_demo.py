"""Assets for the offline demo (`make demo`): a tiny base model warmed up on the answer format, and data files.

    python recipes/prepare_demo.py outputs/demo

writes OUTPUT/base-model (model + tokenizer), OUTPUT/data/train.jsonl and OUTPUT/data/test.jsonl (held-out problems
training never sees). Then `recipes/deepseek_math_style.py --config recipes/configs/tiny-cpu.yaml` trains on them.
"""

import argparse
import os

from grpo_ext.testing import make_arithmetic_splits, make_tiny_model, make_tokenizer, supervised_warm_up


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", default="outputs/demo")
    parser.add_argument("--warm_up_steps", type=int, default=90)  # ~30% held-out accuracy: GRPO does the rest
    parser.add_argument("--hidden_size", type=int, default=64)
    cli = parser.parse_args()

    train, test = make_arithmetic_splits()
    os.makedirs(os.path.join(cli.output_dir, "data"), exist_ok=True)
    train.to_json(os.path.join(cli.output_dir, "data", "train.jsonl"))
    test.to_json(os.path.join(cli.output_dir, "data", "test.jsonl"))

    tokenizer = make_tokenizer()
    model = make_tiny_model("qwen2", tokenizer, hidden_size=cli.hidden_size, intermediate_size=4 * cli.hidden_size)
    loss = supervised_warm_up(model, tokenizer, train, steps=cli.warm_up_steps)
    model_dir = os.path.join(cli.output_dir, "base-model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"warm-up loss {loss:.3f}; base model in {model_dir}; {len(train)} train / {len(test)} held-out problems")


if __name__ == "__main__":
    main()
