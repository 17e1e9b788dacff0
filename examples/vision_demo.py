"""Offline vision demo: a tiny vision-language model learns by GRPO to name drawn figures, on a CPU, in about a minute.

A tiny Qwen2.5-VL (a 1-layer vision tower of width 32, a 2-layer language model), built here with its processor, is
warmed up for a few supervised steps on the answer form ("red circle"), loaded in 4-bit NF4 (the vision tower stays
in full precision) with a LoRA adapter on its language model, and trained by GRPO on TRL's vision-language columns
(a conversational `prompt`, an `image`): 0.5 for the right colour word, 0.5 for the right shape word. The held-out
images are drawn apart; the trainer's evaluation answers them greedily, each prompt with its image.

With a real model, pass its id and `AutoProcessor.from_pretrained(id)` instead (see
recipes/configs/qwen2.5-vl-7b-instruct-multimodal-r1-24gb.yaml). This script builds the processor in memory because
a Qwen2.5-VL processor reloads from disk only with torchvision installed (for its video processor).
"""

import argparse
import os

import torch
from peft import LoraConfig

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.models import four_bit_config
from grpo_ext.testing import make_shape_splits, make_tiny_vlm, shape_reward, vlm_supervised_warm_up


def exact_answer(completions, answer, **kwargs):
    """1.0 when both words are right (the full `shape_reward`), else 0.0: a held-out metric, not a reward."""
    return [float(score == 1.0) for score in shape_reward(completions, answer)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/vision")
    parser.add_argument("--warm_up_steps", type=int, default=100)  # the answer form and some colours: GRPO does more
    parser.add_argument("--max_steps", type=int, default=300)
    cli = parser.parse_args()

    # A base model that knows the answer form: supervised warm-up of a randomly initialised tiny VLM, saved
    train, test = make_shape_splits(num_train=960)  # 12 classes (4 colours x 3 shapes), 96 held-out images
    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=56)
    warm_up_loss = vlm_supervised_warm_up(model, processor, train, steps=cli.warm_up_steps)
    base_dir = os.path.join(cli.output_dir, "base-model")
    model.save_pretrained(base_dir)
    print(f"warm-up loss {warm_up_loss:.3f}; base model in {base_dir}")

    args = GRPOExtConfig(
        output_dir=os.path.join(cli.output_dir, "grpo"),
        model_init_kwargs={"dtype": "float32"},  # CPU: bitsandbytes computes in fp32 here
        per_device_train_batch_size=32,  # 4 prompts x 8 generations
        num_generations=8,
        max_completion_length=16,  # "yellow triangle" + EOS
        learning_rate=8e-4,  # a tiny model with LoRA (3e-3 collapses the policy here); real models want ~1e-5
        lr_scheduler_type="constant",
        beta=0.04,  # DeepSeekMath
        max_steps=cli.max_steps,
        logging_steps=25,
        eval_reward_funcs=[shape_reward, exact_answer],  # held-out greedy answers, each prompt with its image
        eval_task_metrics_only=True,
        per_device_eval_batch_size=96,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOExtTrainer(
        model=base_dir,
        reward_funcs=shape_reward,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=processor,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),  # the language model only
        quantization_config=four_bit_config(torch.float32),  # 4-bit NF4 language model, full-precision vision tower
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(args.output_dir)

    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"\ntraining reward: first {args.logging_steps} steps {rewards[0]:.3f} -> last {rewards[-1]:.3f}")
    for name in ("exact_answer", "shape_reward"):
        key = f"eval_pass@1/{name}"
        print(f"held-out {name} on {len(test)} images: {before[key]:.1%} before -> {after[key]:.1%} after GRPO")
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
