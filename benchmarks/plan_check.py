"""The memory planner (grpo_ext/plan.py) against the measured peak of real GRPO steps, on this machine's CPU.

Each case builds a model locally (random weights: `grpo_ext.testing` tiny models, and a Qwen2.5-Math-1.5B-shaped one
cut to 2 layers), runs `GRPOExtTrainer` for two optimizer steps (the second with AdamW's moments) on fixed-length prompts and full-length completions
(`min_new_tokens`), and measures the peak of live tensor bytes with PyTorch's profiler (`profile_memory=True`: every
allocation and free of the CPU allocator, summed in time order), on top of the weights the model holds when training
starts (its parameters, buffers and 4-bit quantisation constants). No process RSS, no CUDA context term.

    python benchmarks/plan_check.py            # every case, the table of benchmarks/README.md (~1-2 minutes)
    python benchmarks/plan_check.py --cases tiny-plain qwen1.5b-2layers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grpo_ext.plan import GiB, MiB, ModelShape, StepSettings, plan_step  # noqa: E402

# Bigger than the unit-test model (hidden 32, 2 layers), as in bench_step.py
SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
# Qwen2.5-Math-1.5B's layer shapes (grpo_ext/model_configs), 2 of its 28 layers, the test vocabulary
QWEN_1_5B_LAYERS = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=2
)


@dataclass(frozen=True)
class Case:
    name: str
    model: dict = field(default_factory=lambda: dict(SMALL))
    architecture: str = "qwen2"
    four_bit: bool = True
    prefix_sharing: bool = True
    gradient_checkpointing: bool = False
    prompt_length: int = 32  # P
    completion_length: int = 16  # C
    num_generations: int = 4  # G
    batch_size: int = 8  # b = the rollout: one micro-batch per optimizer step
    lora_r: int = 8
    logprob_chunk_size: int = 1024


# The unit tests' cases (tests/test_plan.py): smaller, a few seconds each
TEST = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SHORT = dict(prompt_length=16, completion_length=8)

CASES = {
    case.name: case
    for case in (
        Case("test-plain", model=TEST, prefix_sharing=False, **SHORT),
        Case("test-shared", model=TEST, **SHORT),
        Case("test-checkpointed", model=TEST, prefix_sharing=False, gradient_checkpointing=True, **SHORT),
        Case("test-lm-head", model=dict(TEST, vocab_size=8192), logprob_chunk_size=32, prefix_sharing=False, **SHORT),
        Case("tiny-plain", prefix_sharing=False),
        Case("tiny-shared"),
        Case("tiny-checkpointed", prefix_sharing=False, gradient_checkpointing=True),
        Case("tiny-shared-checkpointed", gradient_checkpointing=True),
        Case("llama-fp32-lora", architecture="llama", four_bit=False, prefix_sharing=False),
        Case("lm-head-heavy", model=dict(SMALL, vocab_size=16384), logprob_chunk_size=64, prefix_sharing=False),
        Case("qwen1.5b-2layers", model=QWEN_1_5B_LAYERS, prompt_length=16, completion_length=8, batch_size=4),
        Case(
            "qwen1.5b-2layers-checkpointed",
            model=QWEN_1_5B_LAYERS,
            prompt_length=16,
            completion_length=8,
            batch_size=4,
            gradient_checkpointing=True,
        ),
    )
}


def predict(case: Case):
    """The planner's plan for the case: fp32 on CPU, LoRA on every linear layer, no CUDA terms."""
    from grpo_ext.testing import _tiny_config, make_tokenizer

    config = _tiny_config(case.architecture, make_tokenizer(), **case.model).to_dict()
    settings = StepSettings(
        per_device_train_batch_size=case.batch_size,
        generation_batch_size=case.batch_size,
        num_generations=case.num_generations,
        prompt_length=case.prompt_length,
        max_completion_length=case.completion_length,
        gradient_checkpointing=case.gradient_checkpointing,
        prefix_sharing=case.prefix_sharing,
        logprob_chunk_size=case.logprob_chunk_size,
        load_in_4bit=case.four_bit,
        double_quant=True,
        dtype_bytes=4,
        lora_r=case.lora_r,
        lora_dropout=False,
        reference="disabled_adapter",
        device="cpu",
    )
    return plan_step(ModelShape.from_config(config), settings)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind parameters, buffers and 4-bit quantisation constants."""
    tensors = list(model.parameters()) + list(model.buffers())
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _live_bytes_peak(profiler) -> int:
    """The largest running sum of the CPU allocator's allocations (+) and frees (-), in time order."""
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type().name == "CPU":
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def measure(case: Case) -> dict:
    """Weights at the start of training and the measured peak of one GRPO step, in bytes."""
    from peft import LoraConfig

    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.models import four_bit_config
    from grpo_ext.testing import digit_fraction_reward, save_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        save_tiny_model(folder, case.architecture, **case.model)
        rng = random.Random(0)
        prompts = ["".join(rng.choice("abcdefgh") for _ in range(case.prompt_length)) for _ in range(16)]
        from datasets import Dataset

        args = GRPOExtConfig(
            output_dir=f"{folder}/out",
            per_device_train_batch_size=case.batch_size,
            num_generations=case.num_generations,
            max_completion_length=case.completion_length,
            generation_kwargs={"min_new_tokens": case.completion_length},  # every completion full length
            prefix_sharing=case.prefix_sharing,
            gradient_checkpointing=case.gradient_checkpointing,
            logprob_chunk_size=case.logprob_chunk_size,
            model_init_kwargs={"dtype": "float32"},
            max_steps=2,  # the second step holds AdamW's moments from the first: the steady state
            bf16=False,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOExtTrainer(
            folder,
            digit_fraction_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            peft_config=LoraConfig(
                r=case.lora_r, lora_alpha=2 * case.lora_r, lora_dropout=0.0, target_modules="all-linear"
            ),
            quantization_config=four_bit_config(torch.float32) if case.four_bit else None,
        )
        weights = _weight_bytes(trainer.model)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
            trainer.train()
    return {"weights": weights, "peak": weights + _live_bytes_peak(profiler)}


def measure_in_subprocess(name: str) -> dict:
    """`measure(CASES[name])` in a fresh process: its own allocator, and one profiling session per process (a second
    session in the same process after a training run recorded no memory events here)."""
    command = [sys.executable, __file__, "--measure", name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str) -> dict:
    return compare_all([name])[0]


def compare_all(names: list[str], parallel: bool = False) -> list[dict]:
    """Predicted and measured peaks of the named cases; `parallel` measures them in concurrent processes."""
    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(names)) as pool:
            measured = list(pool.map(measure_in_subprocess, names))
    else:
        measured = [measure_in_subprocess(name) for name in names]
    return [_row(name, result) for name, result in zip(names, measured)]


def _row(name: str, measured: dict) -> dict:
    plan = predict(CASES[name])
    return {
        "case": name,
        "predicted": plan.peak,
        "predicted_phase": plan.peak_phase,
        "measured": measured["peak"],
        "weights": measured["weights"],
        "ratio": plan.peak / measured["peak"],
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| case | measured weights MiB | measured peak MiB | predicted peak MiB (phase) | predicted / measured |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['weights'] / MiB:.1f} | {row['measured'] / MiB:.1f} | "
            f"{row['predicted'] / MiB:.1f} ({row['predicted_phase']}) | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--measure", choices=list(CASES), help=argparse.SUPPRESS)  # the subprocess of one case
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    if cli.measure:
        print(json.dumps(measure(CASES[cli.measure])))
        return 0
    rows = []
    for name in cli.cases:
        rows += compare_all([name])
        print(
            f"{name}: predicted {rows[-1]['predicted'] / MiB:.1f} MiB, measured {rows[-1]['measured'] / MiB:.1f} MiB",
            file=sys.stderr,
        )
    print(markdown_table(rows))
    print(f"\n(total {sum(r['measured'] for r in rows) / GiB:.2f} GiB measured over {len(rows)} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
