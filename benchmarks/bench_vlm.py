"""One vision-language GRPO step, trl.GRPOTrainer vs grpo_ext.GRPOExtTrainer, on the same locally built Qwen2.5-VL,
image dataset, seed and config: what encoding each prompt and its image once per group saves.

TRL repeats each prompt, its image included, G times: the vision encoder and the prompt's tokens run G times in
generation and again in every scoring pass. grpo-ext with `prefix_sharing` (as shipped) prefills each prompt once
with its image and scores the completions against the group's prompt keys/values (grpo_ext/prefix_sharing.py).

Runs, each in its own subprocess (its peak RSS its own): `trl` (1.16), `ours` (GRPOExtTrainer with
`prefix_sharing=False`, `drop_finished_rows=False`: every row encoded with its own copy of the image, as in TRL) and
`ours+sharing` (as shipped). Phases and clock as in bench_step.py: CPU seconds of the worker with one torch thread,
fastest timed step; generation = the trainer's generation call, scoring = the rest of the rollout (rewards,
reference log-probs), training = the loss forward and backward, whole step = step begin to step end.

Model: a random Qwen2.5-VL (language model hidden 256, 4 layers, 8 heads / 4 KV heads; vision tower hidden 128,
2 blocks, 14-pixel patches merged 2 x 2) with the test tokenizer and processor of `grpo_ext.testing.make_tiny_vlm`.
Images of `--image-size` pixels (448: 32 x 32 patches, 256 image tokens), prompts of ~270 tokens, G=8, 2 prompts per
step, 32-token completions (`min_new_tokens`: every completion has the full length), beta=0.04.

    python benchmarks/bench_vlm.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/bench_vlm.py --image-size 224 --steps 4

Benchmarks measure; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import PHASES, PhaseTimer, step_times  # noqa: E402

TRAINERS = ("trl", "ours", "ours+sharing")
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
VISION = dict(
    hidden_size=128, intermediate_size=512, num_heads=4, depth=2, out_hidden_size=256, fullatt_block_indexes=[1]
)


def save_model(folder: str, image_size: int) -> str:
    """A random Qwen2.5-VL of the benchmark's size, saved so both trainers load the same weights."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from grpo_ext.testing import make_tiny_vlm

    tiny, _ = make_tiny_vlm("qwen2_5_vl", image_size=image_size)
    text_config = {**tiny.config.text_config.to_dict(), **TEXT}
    text_config.pop("layer_types", None)  # rebuilt for the new number of layers
    text_config["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 6, 6]}  # head_dim 32: 16 rotary pairs
    vision_config = {**tiny.config.vision_config.to_dict(), **VISION}
    tokens = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
        **{name: getattr(tiny.config, name) for name in tokens},
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = tiny.generation_config
    model.save_pretrained(folder)
    return folder


def make_dataset(num_prompts: int, image_size: int):
    """TRL's vision dataset shape: a conversational prompt and an `image` column (noise images: a varied prompt)."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(num_prompts)]  # fmt: skip
    prompt = [{"role": "user", "content": "Describe the image in a few words."}]
    return Dataset.from_dict({"prompt": [prompt] * num_prompts, "image": images})


def distinct_characters(completions, **kwargs):
    return [float(len(set(c[0]["content"]))) for c in completions]


def run_trainer(trainer_name: str, model_path: str, steps: int, warmup: int, image_size: int) -> dict:
    import torch

    from grpo_ext.testing import make_tiny_vlm  # its processor (the saved one has no video processor to load)

    settings = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-vlm-{trainer_name}-"),
        per_device_train_batch_size=16,  # 2 prompts x 8 generations, one rollout per optimizer step
        num_generations=8,
        max_completion_length=32,
        generation_kwargs={"min_new_tokens": 32},
        temperature=1.0,
        beta=0.04,
        learning_rate=1e-5,
        max_steps=steps,
        logging_steps=steps,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    timer = PhaseTimer()
    if trainer_name == "trl":
        from trl import GRPOConfig, GRPOTrainer

        trainer_cls, rollout = GRPOTrainer, "_generate_and_score_completions"
        args = GRPOConfig(**settings, use_bias_correction_kl=False)
    else:
        from grpo_ext import GRPOExtConfig, GRPOExtTrainer

        trainer_cls, rollout = GRPOExtTrainer, "generate_and_score"
        shipped = trainer_name == "ours+sharing"
        args = GRPOExtConfig(**settings, prefix_sharing=shipped, drop_finished_rows=shipped)
    timer.wrap(trainer_cls, rollout, "scoring")
    timer.wrap(trainer_cls, "training_step", "training")
    per_step = []

    torch.manual_seed(0)
    trainer = trainer_cls(
        model_path, distinct_characters, args=args, train_dataset=make_dataset(2 * steps, image_size),
        processing_class=make_tiny_vlm("qwen2_5_vl", image_size=image_size)[1], callbacks=[step_times(timer, per_step)],
    )  # fmt: skip
    if trainer_name == "trl":
        timer.wrap(trainer.model, "generate", "generation")
    else:
        import grpo_ext.engine as engine_module

        timer.wrap(engine_module, "generate_completions", "generation")
    images_encoded = []
    visual = trainer.model.model.visual
    visual.register_forward_hook(lambda m, a, kw, out: images_encoded.append(len(kw["grid_thw"])), with_kwargs=True)
    rss_before_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from grpo_ext import decoding, prefix_sharing

    return {
        "steps": per_step[warmup:] or per_step,
        "peak_rss_mib": peak_rss / 1024,
        "train_rss_mib": (peak_rss - rss_before_train) / 1024,
        "images_encoded_per_step": sum(images_encoded) / steps,
        "fallbacks": sorted(prefix_sharing._WARNED | decoding._WARNED),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--image-size", type=int, default=448, help="pixels per side (448: 256 image tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.environ["BENCH_CLOCK"] = options.clock
    import torch

    torch.set_num_threads(options.threads)
    if options.worker:
        print(json.dumps(run_trainer(**json.loads(options.worker))))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model_path = save_model(folder, options.image_size)
        for name in TRAINERS:
            print(f"{name} ...", file=sys.stderr, flush=True)
            job = dict(trainer_name=name, model_path=model_path, steps=options.steps, warmup=1, image_size=options.image_size)  # fmt: skip
            command = [sys.executable, __file__, "--worker", json.dumps(job), "--threads", str(options.threads)]
            command += ["--clock", options.clock]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
            output = run.stdout
            results[name] = json.loads(output.strip().splitlines()[-1])
    tokens = (options.image_size // 28) ** 2
    print(f"\n{options.image_size} x {options.image_size} images ({tokens} image tokens each), 2 prompts x G=8 per step, "
          f"32-token completions; {options.clock} seconds per step (fastest of {options.steps - 1} timed), torch threads "
          f"{options.threads}; ratio to TRL in brackets\n")  # fmt: skip
    print("| trainer | generation | scoring | training | whole step | peak RSS MiB | RSS growth in train() | images through the policy's vision encoder per step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    trl = results["trl"]
    best = {name: {phase: min(step[phase] for step in r["steps"]) for phase in PHASES} for name, r in results.items()}
    for name, result in results.items():
        cells = [
            f"{best[name][phase]:.2f}" + ("" if name == "trl" else f" ({best[name][phase] / best['trl'][phase]:.2f}x)")
            for phase in PHASES
        ]
        for key in ("peak_rss_mib", "train_rss_mib"):
            cells.append(f"{result[key]:.0f}" + ("" if name == "trl" else f" ({result[key] / max(trl[key], 1):.2f}x)"))
        cells.append(f"{result['images_encoded_per_step']:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, result in results.items():
        for reason in result["fallbacks"]:
            print(f"\nWARNING: {name} fell back: {reason}")


if __name__ == "__main__":
    main()
