"""Held-out accuracy of a base model, or a base model plus a trained adapter: greedy pass@1, and pass@k / maj@k from k
samples, as JSON (the task metrics the trainer logs during training, grpo_ext.evaluation).

    python recipes/evaluate.py --model Qwen/Qwen2.5-Math-1.5B --adapter outputs/qwen-math-grpo \
        --dataset openai/gsm8k --dataset_config main --split test --num_samples 8 --output results.json
    python recipes/evaluate.py --model outputs/smollm2/base-model --adapter outputs/smollm2/grpo \
        --dataset outputs/smollm2/data/test.jsonl --instruction "End your reply with 'Answer: <number>'." \
        --max_new_tokens 32 --reward_funcs answer_line accuracy
"""

import argparse
import json
import logging

from grpo_ext.cpu import set_torch_threads

# torch, transformers, datasets and the reward functions are imported once the arguments are parsed, so `--help`
# answers at once.


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Base model id or path.")
    parser.add_argument("--adapter", default=None, help="PEFT adapter path or id to load on top of the base.")
    parser.add_argument("--dataset", default="openai/gsm8k", help="Hub dataset id or local data file.")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--instruction",
        default=None,
        help="Appended to questions; '' for none (default: DeepSeekMath's, grpo_ext.data.DEEPSEEKMATH_INSTRUCTION).",
    )
    parser.add_argument("--plain_prompts", action="store_true", help="Plain text prompts instead of chat messages.")
    parser.add_argument("--max_problems", type=int, default=None)
    parser.add_argument("--num_samples", type=int, default=1, help="1: greedy pass@1; k: also pass@k, maj@k.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="auto: the checkpoint's dtype, or float32 on a CPU without native bf16 / fp16 kernels.",
    )
    parser.add_argument(
        "--reward_funcs",
        nargs="+",
        default=["accuracy"],
        help="Rewards that score a completion 1.0 when correct (registry names or dotted paths); the first is pass@1.",
    )
    parser.add_argument("--output", default=None, help="Write the summary JSON here too.")
    cli = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpo_ext").setLevel(logging.INFO)  # grpo-ext's one-time notes: threads, dtype
    set_torch_threads()
    from grpo_ext.data import DEEPSEEKMATH_INSTRUCTION, load_split, to_prompt_answer
    from grpo_ext.evaluation import evaluate_accuracy
    from grpo_ext.models import load_tokenizer
    from reward_models import get_reward_funcs

    instruction = DEEPSEEKMATH_INSTRUCTION if cli.instruction is None else cli.instruction
    dataset = to_prompt_answer(
        load_split(cli.dataset, cli.dataset_config, cli.split),
        instruction=instruction or None,
        conversational=not cli.plain_prompts,
    )
    if cli.max_problems:
        dataset = dataset.select(range(min(cli.max_problems, len(dataset))))
    model = load_model(cli.model, cli.adapter, cli.dtype)
    tokenizer = load_tokenizer(cli.adapter or cli.model)  # the trainer saves the tokenizer beside the adapter

    results = evaluate_accuracy(
        model,
        tokenizer,
        dataset,
        cli.num_samples,
        cli.max_new_tokens,
        cli.temperature,
        cli.batch_size,
        reward_funcs=dict(zip(cli.reward_funcs, get_reward_funcs(cli.reward_funcs, warn_unused=False))),
    )
    summary = {"model": cli.model, "adapter": cli.adapter, "dataset": cli.dataset, "split": cli.split, **results}
    print(json.dumps(summary, indent=2))
    if cli.output:
        with open(cli.output, "w") as file:
            json.dump(summary, file, indent=2)


def load_model(name: str, adapter: str | None = None, dtype: str = "auto"):
    """The base model (a model id, a folder or a .gguf file), with `adapter` on top if given, on CUDA when there is
    one. On the CPU, `auto` is float32 when the checkpoint's bf16 / fp16 has no native kernels there
    (`models.load_causal_lm`)."""
    import torch

    from grpo_ext.models import load_causal_lm, peft_checkpointing_read_ignored

    on_cuda = torch.cuda.is_available()
    model = load_causal_lm(name, {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}, on_cpu=not on_cuda)
    if adapter:
        from peft import PeftModel

        with peft_checkpointing_read_ignored():
            model = PeftModel.from_pretrained(model, adapter)
    return model.to("cuda") if on_cuda else model


if __name__ == "__main__":
    main()
