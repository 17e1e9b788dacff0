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
  `use_transformers_continuous_batching` runs), with the completion lengths it produced (`--continuous-batching`);
- `grpo-ext+drafts`: grpo-ext's rollout with speculative decoding, `--draft-tokens` drafts per row from the group
  (speculative.py), and `grpo-ext+drafts+memory`: the same with the group's earlier completions of these prompts
  remembered (a later epoch: the warm-up call fills the memory). Each prints its last call's acceptance rate and the
  tokens a row emitted per forward it took part in.

`--real` runs the engines on the real model instead: SmolLM2-135M-Instruct on the real-model demo's prompts (2
multiplication prompts through the chat template, G=8, temperature 0.7, up to 32 new tokens, natural lengths).
`--greedy` decodes greedily instead, as the task evaluation answers its held-out prompts at every evaluation.

The profile line splits `generate`'s time between the linear layers (the matrix products), attention and the rest
(Python, elementwise kernels, cache bookkeeping): the part a compiled step could remove is the rest.

    python benchmarks/bench_decode.py                                   # generate, grpo-ext, static, ~1 min
    python benchmarks/bench_decode.py --compile --continuous-batching   # every engine, ~6 min on 2 CPU cores
    python benchmarks/bench_decode.py --real                            # the real model, ~1 min
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from bench_step import MODEL, SHAPES
from transformers import CompileConfig, GenerationConfig

from grpo_ext.drafting import DraftMemory
from grpo_ext.rollout import GenerationPlan, encode_prompts, generate_completions
from grpo_ext.speculative import DraftStats
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
    parser.add_argument("--draft-tokens", type=int, default=4, help="Drafts per row for the drafting engines.")
    parser.add_argument("--real", action="store_true", help="The real model (SmolLM2-135M-Instruct) and task.")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (as the task evaluation answers).")
    options = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)

    if options.real:
        options.shape = "smollm2-135m"
        model, tokenizer, prompt_ids, prompt_mask, sampling, G = _real_rollout(device)
        prompt_length, completion_length = prompt_ids.size(1), sampling["max_new_tokens"]
    else:
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
    if options.greedy:
        sampling["do_sample"] = False
        sampling.pop("temperature")
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
    draft_stats = {}  # engine -> the DraftStats of its last call
    drafting = GenerationPlan(True, True, True, draft_tokens=options.draft_tokens)
    memory = DraftMemory(max_prompts=16, per_prompt=G)

    def drafted(name, draft_memory):
        draft_stats[name] = DraftStats()
        return generate_completions(
            model, prompt_ids, prompt_mask, G, dynamic, drafting, draft_memory, draft_stats[name]
        )

    for name, draft_memory in (("grpo-ext+drafts", None), ("grpo-ext+drafts+memory", memory)):
        engines[name] = lambda name=name, draft_memory=draft_memory: drafted(name, draft_memory)
    if options.real:
        del engines["static"]
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
            completions = output if name.startswith("grpo-ext") else output[:, prompt_length:]
            lengths = [len(ids) for ids in token_lists(completions, sampling["eos_token_id"])]
        baseline = baseline or seconds
        tokens = f"{min(lengths)}-{max(lengths)} per row, {sum(lengths)} in all"
        if name in draft_stats:  # its last call's
            stats = draft_stats[name]
            tokens += f"; {stats.acceptance_rate:.0%} of drafts accepted, {stats.tokens_per_forward:.2f} tokens/forward"
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f}x | {tokens} |", flush=True)
    split = _profile_split(engines["generate"])
    print(
        f"\n`generate` profile: linear layers {split['linear']:.0%}, attention {split['attention']:.0%}, "
        f"the rest (Python, elementwise kernels, cache) {split['rest']:.0%}"
    )


def token_lists(completions: torch.Tensor, eos_token_id) -> list[list[int]]:
    from grpo_ext.rollout import token_lists_until_stop

    return token_lists_until_stop(completions, eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])


def _real_rollout(device: str):
    """SmolLM2-135M-Instruct, 2 of the real-model demo's prompts repeated G=8 times, its sampling settings."""
    from bench_step import real_workload

    from grpo_ext.models import load_causal_lm, load_tokenizer
    from grpo_ext.rollout import eos_token_ids

    model_path, dataset, _, _ = real_workload(2)
    model = load_causal_lm(model_path, {"dtype": torch.float32}).to(device).eval()
    tokenizer = load_tokenizer(model_path)
    G = 8
    prompts = [row["prompt"] for row in dataset for _ in range(G)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, None, None, device)  # (2G, P)
    sampling = dict(
        do_sample=True,
        temperature=0.7,
        max_new_tokens=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
    )
    return model, tokenizer, prompt_ids, prompt_mask, sampling, G


if __name__ == "__main__":
    main()
