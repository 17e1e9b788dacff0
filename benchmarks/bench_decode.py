"""Decoding engines on one rollout batch: which way of sampling the completions is fastest, on this machine.

The rollout of bench_step.py's shapes (2 prompts x G=8, the same random Qwen2, `min_new_tokens` for the fixed-length
shapes), sampled by each engine from the same prompts, timed in one process (fastest of `--repeats` after a warm-up
call, CPU seconds on a CPU with one torch thread, wall seconds with a CUDA synchronise on a GPU):

- `generate`: `model.generate` with a dynamic cache, every prompt prefilled G times (what trl.GRPOTrainer runs);
- `grpo-ext`: grpo-ext's rollout as shipped (`rollout.generate_completions`: each prompt prefilled once per group,
  finished rows dropped from the batch and the cache);
- `static`: `model.generate` with `cache_implementation="static"` (grpo-ext's and TRL's `cache_implementation`
  field); on CUDA `generate` compiles its decoding step by itself, on a CPU it does not;
- `static+compile`: the same with the compilation forced on a CPU too (`CompileConfig._compile_all_devices`); the
  first call (compilation) is reported separately (`--compile`, minutes on a CPU);
- `continuous-batching`: transformers' `generate_batch` (paged attention, what TRL's
  `use_transformers_continuous_batching` runs), with the completion lengths it produced (`--continuous-batching`).

The profile line splits `generate`'s time between the linear layers (the matrix products), attention and the rest
(Python, elementwise kernels, cache bookkeeping): the part a compiled step could remove is the rest.

    python benchmarks/bench_decode.py                                   # generate, grpo-ext, static, ~1 min
    python benchmarks/bench_decode.py --compile --continuous-batching   # every engine, ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from bench_step import MODEL, SHAPES
from transformers import CompileConfig, GenerationConfig

from grpo_ext.rollout import GenerationPlan, generate_completions
from grpo_ext.testing import make_tiny_model, make_tokenizer


def _clock(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def _timed(run, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    output = run()  # warm-up (and compilation, for the compiled engine)
    best = float("inf")
    for _ in range(repeats):
        start = _clock(device)
        output = run()
        best = min(best, _clock(device) - start)
    return best, output


def _profile_split(run) -> dict[str, float]:
    profile = cProfile.Profile()
    profile.runcall(run)
    stats = pstats.Stats(profile).stats
    total = sum(entry[2] for entry in stats.values())  # own time of every function
    own = lambda name: sum(e[2] for (_, _, function), e in stats.items() if name in function)  # noqa: E731
    linear, attention = own("_nn.linear"), own("scaled_dot_product_attention")
    return {"linear": linear / total, "attention": attention / total, "rest": 1 - (linear + attention) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="completion-heavy")
    parser.add_argument("--repeats", type=int, default=2, help="Timed calls per engine, fastest kept (default 2).")
    parser.add_argument("--compile", action="store_true", help="Also the static cache with a compiled step.")
    parser.add_argument("--continuous-batching", action="store_true", help="Also transformers' generate_batch.")
    options = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)

    prompt_length, completion_length, G = SHAPES[options.shape]
    tokenizer = make_tokenizer()
    model = make_tiny_model("qwen2", tokenizer, **MODEL).to(device).eval()
    torch.manual_seed(0)
    unique = torch.randint(5, len(tokenizer) - 5, (2, prompt_length), device=device)  # (2, P)
    prompt_ids = unique.repeat_interleave(G, 0)  # (2G, P)
    prompt_mask = torch.ones_like(prompt_ids)
    sampling = dict(
        do_sample=True,
        temperature=1.0,
        max_new_tokens=completion_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if options.shape != "uneven":
        sampling["min_new_tokens"] = completion_length
    dynamic = GenerationConfig(**sampling)
    static = GenerationConfig(**sampling, cache_implementation="static", disable_compile=device != "cuda")
    forced = CompileConfig()
    forced._compile_all_devices = True  # generate compiles only on accelerators unless told
    compiled = GenerationConfig(**sampling, cache_implementation="static", compile_config=forced)

    def generate(config):
        return lambda: model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)

    engines = {
        "generate": generate(dynamic),
        "grpo-ext": lambda: generate_completions(
            model, prompt_ids, prompt_mask, G, dynamic, GenerationPlan(True, True, True)
        ),
        "static": generate(static),
    }
    if options.compile:
        engines["static+compile"] = generate(compiled)
    if options.continuous_batching:
        prompts = prompt_ids.tolist()
        engines["continuous-batching"] = lambda: model.generate_batch(prompts, generation_config=dynamic)

    print(
        f"{options.shape}: {2 * G} rows, {prompt_length}-token prompts, up to {completion_length} new tokens, {device}"
    )
    print("| engine | seconds | ratio to generate | completion tokens |")
    print("|---|---|---|---|")
    baseline = None
    for name, run in engines.items():
        if name == "static+compile":
            start = _clock(device)
            run()
            print(f"| static+compile, first call (compilation) | {_clock(device) - start:.2f} | | |")
        seconds, output = _timed(run, device, options.repeats)
        if name == "continuous-batching":
            lengths = [len(result.generated_tokens) for result in output.values()]
        else:
            completions = output if name == "grpo-ext" else output[:, prompt_length:]
            lengths = (completions != tokenizer.pad_token_id).sum(-1).tolist()
        baseline = baseline or seconds
        tokens = f"{min(lengths)}-{max(lengths)} per row, {sum(lengths)} in all"
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f}x | {tokens} |", flush=True)
    split = _profile_split(engines["generate"])
    print(
        f"\n`generate` profile: linear layers {split['linear']:.0%}, attention {split['attention']:.0%}, "
        f"the rest (Python, elementwise kernels, cache) {split['rest']:.0%}"
    )


if __name__ == "__main__":
    main()
