"""The Python part of benchmarks/gpu_check.sh: a few GRPO steps of the shipped recipes on random-weight models.

For each (recipe, trainer) it builds the recipe's model from its shipped config (grpo_ext/model_configs, random
weights: only memory and time are measured), loads it in 4-bit with the recipe's LoRA, runs `--steps` optimizer steps
on synthetic prompts of `--prompt-length` tokens with full-length completions, and writes peak
`torch.cuda.max_memory_allocated`, the seconds per step after the first, and the planner's prediction to
`$OUT/gpu_check.json` (or `benchmarks/gpu_check.json`). `trl` runs `trl.GRPOTrainer` on the same config (TRL's field
names), `grpo-ext` runs `GRPOExtTrainer`. `--dry-run`: CPU, a tiny model, one step each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

RECIPES = {
    "8gb": ("recipes/configs/qwen2.5-math-1.5b-gsm8k-8gb.yaml", "8GiB"),
    "24gb": ("recipes/configs/qwen2.5-math-1.5b-gsm8k-24gb.yaml", "24GiB"),
    "7b-24gb": ("recipes/configs/qwen2.5-7b-instruct-gsm8k-24gb.yaml", "24GiB"),
}
TRAINER_FIELDS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "max_completion_length",
    "learning_rate",
    "beta",
    "loss_type",
    "temperature",
    "bf16",
    "gradient_checkpointing",
)


def _require_imports():
    missing = []
    for name in ("torch", "trl", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "yaml"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(
            f"gpu_check: missing {', '.join(missing)}. Install from carried wheels: "
            "pip install --no-index --find-links wheels/ " + " ".join(missing)
        )


def _model_folder(config: dict, folder: str, tokenizer) -> str:
    """A random-weight model of `config` saved with the test tokenizer (ids beyond it are never decoded wrongly:
    completions are decoded by the same tokenizer, unknown ids skipped)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(**config)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def run_one(recipe: str, trainer_name: str, cli) -> dict:
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig

    from grpo_ext.models import four_bit_config
    from grpo_ext.plan import load_model_config, plan_config_file, plan_step
    from grpo_ext.testing import digit_fraction_reward, make_tokenizer, save_tiny_model

    path, budget = RECIPES[recipe]
    with open(path) as file:
        values = yaml.safe_load(file)
    values.update(max_steps=cli.steps, report_to="none", save_strategy="no", logging_steps=1)
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        if cli.dry_run:  # a tiny model, short sequences, CPU
            save_tiny_model(folder)
            values.update(
                bf16=False,
                use_cpu=True,
                max_completion_length=8,
                per_device_train_batch_size=4,
                gradient_accumulation_steps=1,
                num_generations=4,
                gradient_checkpointing=False,
            )
            model_config, compute_dtype = f"{folder}/config.json", torch.float32
        else:
            config, _ = load_model_config(values["model_name_or_path"])
            _model_folder({**config, "pad_token_id": tokenizer.pad_token_id}, folder, tokenizer)
            model_config, compute_dtype = values["model_name_or_path"], torch.bfloat16
        shape, settings = plan_config_file(path, model_config, cli.prompt_length)
        settings = settings.replace(
            **{k: values[k] for k in ("per_device_train_batch_size", "max_completion_length", "num_generations")},
            gradient_checkpointing=values["gradient_checkpointing"],
            generation_batch_size=values["per_device_train_batch_size"] * values["gradient_accumulation_steps"],
            device="cpu" if cli.dry_run else "cuda",
        )
        predicted = plan_step(shape, settings).peak
        prompts = ["".join("abcdefgh"[(i * 7 + j) % 8] for j in range(cli.prompt_length)) for i in range(64)]
        fields = {k: values[k] for k in TRAINER_FIELDS}
        fields.update(
            output_dir=f"{folder}/out",
            max_steps=cli.steps,
            report_to="none",
            save_strategy="no",
            use_cpu=cli.dry_run,
            logging_steps=1,
            generation_kwargs={"min_new_tokens": fields["max_completion_length"]},
        )
        lora = LoraConfig(
            r=values["lora_r"],
            lora_alpha=values["lora_alpha"],
            lora_dropout=values["lora_dropout"],
            target_modules=values["lora_target_modules"],
            task_type="CAUSAL_LM",
        )
        quantization = four_bit_config(compute_dtype)
        if trainer_name == "trl":
            from transformers import AutoModelForCausalLM
            from trl import GRPOConfig, GRPOTrainer

            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=compute_dtype)
            trainer = GRPOTrainer(
                model,
                digit_fraction_reward,
                args=GRPOConfig(**fields),
                peft_config=lora,
                train_dataset=Dataset.from_dict({"prompt": prompts}),
                processing_class=tokenizer,
            )
        else:
            from grpo_ext import GRPOExtConfig, GRPOExtTrainer

            fields["model_init_kwargs"] = {"dtype": str(compute_dtype).replace("torch.", "")}
            trainer = GRPOExtTrainer(
                folder,
                digit_fraction_reward,
                args=GRPOExtConfig(**fields),
                peft_config=lora,
                quantization_config=quantization,
                processing_class=tokenizer,
                train_dataset=Dataset.from_dict({"prompt": prompts}),
            )
        step_times = []
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                step_times.append(time.perf_counter() - self.start)

        trainer.add_callback(Timer())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    timed = step_times[1:] or step_times
    return {
        "recipe": path,
        "trainer": trainer_name,
        "budget": budget,
        "peak_allocated_bytes": peak,
        "predicted_peak_bytes": predicted,
        "seconds_per_step": sum(timed) / len(timed),
        "dry_run": cli.dry_run,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model: checks the script in seconds")
    parser.add_argument("--with-7b", action="store_true", help="also the 7B-shaped model (24 GB recipe)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--trainers", nargs="*", default=["grpo-ext", "trl"])
    parser.add_argument("--output", default=None, help="JSON path (default $OUT/gpu_check.json)")
    cli = parser.parse_args(argv)
    _require_imports()
    import torch

    if cli.dry_run:
        cli.steps, cli.prompt_length = 1, 8
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --dry-run to check the script on a CPU.")
    recipes = ["8gb", "24gb"] + (["7b-24gb"] if cli.with_7b else [])
    results = []
    for recipe in recipes[:1] if cli.dry_run else recipes:
        for trainer_name in cli.trainers:
            results.append(run_one(recipe, trainer_name, cli))
            print(json.dumps(results[-1]), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    output = cli.output or os.path.join(os.environ.get("OUT") or "benchmarks", "gpu_check.json")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as file:
        json.dump(
            {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "runs": results},
            file,
            indent=2,
        )
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
