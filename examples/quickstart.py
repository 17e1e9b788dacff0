"""Offline quickstart: GRPO on a tiny locally built model, on a laptop CPU, in seconds.

The task is deliberately simple: the reward is the fraction of digits in the completion, so a random policy
scores about 0.1 (10 digits in a 90-token vocabulary). GRPO should push the mean reward above 0.9.
With a real model, pass its id instead (e.g. "Qwen/Qwen2.5-Math-1.5B") and a real reward (see recipes/).
"""

import argparse

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.testing import make_prompt_dataset, make_tiny_model, make_tokenizer


def digit_reward(completions, **kwargs):
    """TRL's reward contract: one float (or None) per completion; dataset columns arrive as keyword arguments."""
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in completions]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--max_steps", type=int, default=120)
    cli = parser.parse_args()

    tokenizer = make_tokenizer()
    args = GRPOExtConfig(
        output_dir=cli.output_dir,
        per_device_train_batch_size=16,  # 2 prompts x 8 generations = 16 completions per step
        num_generations=8,
        max_completion_length=4,
        learning_rate=3e-3,  # a tiny randomly initialised model; real models want 1e-6 (full) or 1e-5 (LoRA)
        beta=0.04,  # DeepSeekMath's KL coefficient
        max_steps=cli.max_steps,
        logging_steps=10,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    trainer = GRPOExtTrainer(
        model=make_tiny_model("qwen2", tokenizer),
        reward_funcs=digit_reward,
        args=args,
        train_dataset=make_prompt_dataset(64),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(cli.output_dir)

    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(
        f"\nmean reward: first {args.logging_steps} steps {rewards[0]:.3f} -> last {args.logging_steps} steps {rewards[-1]:.3f}"
    )
    print(f"model saved to {cli.output_dir}")


if __name__ == "__main__":
    main()
