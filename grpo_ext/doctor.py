"""Pre-flight check: will this GRPO run learn? A few rollouts of the untrained model and the run's settings, read for
the problems that make a run learn nothing, each named with its numbers and its fix, then one verdict.

    python -m grpo_ext.doctor --config recipes/configs/smollm2-135m-cpu.yaml [--steps 2] [--gpu-memory 8GiB]

takes the recipe's YAML and command-line overrides as `recipes/deepseek_math_style.py` does, prints the report and
exits 0 when the run is ready, 1 when it will not learn, 2 on a usage error. `doctor_steps: N` in a config runs the same
check at the start of `train()`, where the trainer logs the report.

What is checked (thresholds are the constants below):

- completions cut at `max_completion_length` (no stop token): a warning above 10%, blocking above half;
- groups whose G rewards are all equal (zero spread: zero advantages, no gradient): a warning above a quarter,
  blocking above half (with `dynamic_sampling`, which resamples them, blocking only when no group varies);
- each reward function's mean, spread, share of None and correlation with the others; one that never varies;
- a reward paying for a surface feature alone: it pays (> 0) on completions that every task metric
  (`eval_reward_funcs`) marks wrong, and pays the right ones (if any) not clearly more: its mean on them exceeds its
  mean on the wrong ones by less than half its range; skipped with a note when there are no task metrics;
- the stop tokens in use, decoded;
- the learning rate against LoRA's typical GRPO range, or full fine-tuning's;
- `bf16` on a CPU without native bf16 kernels;
- the memory planner's verdict (`plan.py`) when `gpu_memory_budget` is set or a budget is given.

Only most groups zero-spread, most completions cut and a LoRA learning rate far too low are blocking ("will not learn
because ..."); the rest are warnings or notes.

Two parts: `diagnose(sample, settings)` turns plain tensors and numbers (`RolloutSample`, `RunSettings`) into a
`DoctorReport`, with no model; `preflight(trainer, steps)` samples the rollouts through the trainer's seams
(`_generate`, `rewards.score`, `task_metrics.score`) and calls it.

It does not train or change anything: no gradient, nothing stepped, the model's mode and the random state put back. It
does not evaluate held-out data (`evaluation.py`), predict memory itself (`plan.py`), roll out with tools or
environments (single-turn prompts only), or stop a training run (the trainer only logs the report).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from datasets import IterableDataset

from .advantages import group_std, nanstd
from .cpu import cpu_has_fast_bf16
from .data import first_rows
from .evaluation import SOLVED
from .models import unwrap_causal_lm, unwrap_distributed
from .plan import format_bytes, parse_memory, plan_step, run_step_inputs
from .plan import verdict as memory_verdict
from .rollout import Rollout, varying_groups

logger = logging.getLogger(__name__)

BLOCKING, WARNING, INFO = "blocking", "warning", "info"

MOST = 0.5  # "most": above half of the completions (truncation) or groups (zero spread) is blocking
TRUNCATED_WARN = 0.10  # cut completions are scored on answers that never finished
ZERO_SPREAD_WARN = 0.25  # a binary reward solved 10% of the time gives G=8 all-zero groups 43% of the time
LORA_LR_RANGE = (1e-5, 2e-4)  # typical LoRA GRPO learning rates (the recipes use 1e-5 on 1.5B, 2e-4 on 135M)
LORA_LR_FAR_TOO_LOW = 2e-6  # 5x below the range: DeepSeekMath's full fine-tuning 1e-6 given to an adapter
LORA_LR_TOO_HIGH = 1e-3  # 5x above the range
FULL_LR_RISKY = 1e-4  # full fine-tuning: every weight moves; DeepSeekMath uses 1e-6
SURFACE_GAP = 0.5  # of a reward's range: how much more it must pay right answers than wrong ones to track the task
EXAMPLE_CHARS = 60  # of a completion quoted as an example


# --- The pure part: plain tensors and numbers in, findings and a verdict out ---


@dataclass
class RolloutSample:
    """What a few rollouts gave: N completions in consecutive groups of G, K reward functions, M task metrics."""

    reward_names: list[str]
    rewards: torch.Tensor  # (N, K) each function's reward, NaN where it returned None
    total: torch.Tensor  # (N,) the weighted sum the advantages are computed from (NaN where no function scored)
    num_generations: int  # G
    truncated: list[bool]  # (N,) no stop token within max_completion_length
    max_completion_length: int
    texts: list[str] = field(default_factory=list)  # (N,) the completions as text, for examples
    task_names: list[str] = field(default_factory=list)
    task_scores: torch.Tensor | None = None  # (N, M) 1.0 correct, 0.0 wrong, NaN not scored
    task_note: str = ""  # why there are no task scores


@dataclass
class RunSettings:
    """The settings the checks read besides the rollouts."""

    learning_rate: float
    finetuning: str  # "lora", "full", or another PEFT method's name
    stop_tokens: list[tuple[int, str]] = field(default_factory=list)  # (id, text)
    bf16: bool = False
    on_cpu: bool = False
    cpu_fast_bf16: bool = True
    dynamic_sampling: bool = False
    memory_peak: int | None = None  # bytes, the planner's prediction
    memory_phase: str = ""
    memory_budget: int | None = None  # bytes


@dataclass(frozen=True)
class Finding:
    """One thing a check found."""

    severity: str  # BLOCKING, WARNING or INFO
    check: str  # truncation, zero_spread, reward, correlation, surface_reward, stop_tokens, learning_rate, bf16, memory
    what: str  # what was found, with its numbers
    numbers: dict = field(default_factory=dict)  # the same numbers, for programs and tests
    fix: str = ""


@dataclass
class DoctorReport:
    """Every check's findings; `ready` unless one is blocking."""

    findings: list[Finding]
    header: str = ""

    @property
    def blocking(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == BLOCKING]

    @property
    def ready(self) -> bool:
        return not self.blocking

    @property
    def needs_attention(self) -> bool:
        return any(finding.severity != INFO for finding in self.findings)

    @property
    def verdict(self) -> str:
        if self.ready:
            return "ready"
        return "will not learn because " + "; ".join(f"{f.what} (fix: {f.fix})" for f in self.blocking)

    def of(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [finding for finding in self.findings if finding.check == check]

    def text(self) -> str:
        """The report as printed: warnings, then notes, then the verdict with each blocking problem and its fix."""
        lines = [f"pre-flight check: {self.header}"]
        warnings = [finding for finding in self.findings if finding.severity == WARNING]
        notes = [finding for finding in self.findings if finding.severity == INFO]
        for finding in warnings + notes:
            lines.append(f"  [{finding.severity}] {finding.what}")
            if finding.fix and finding.severity == WARNING:
                lines.append(f"      fix: {finding.fix}")
        if self.ready:
            lines.append("verdict: ready")
        else:
            lines.append("verdict: will not learn because")
            for finding in self.blocking:
                lines += [f"  - {finding.what}", f"      fix: {finding.fix}"]
        return "\n".join(lines)


def diagnose(sample: RolloutSample, settings: RunSettings) -> DoctorReport:
    """Every check on the rollouts and the settings, in one report."""
    findings = [
        *check_truncation(sample),
        *check_zero_spread(sample, settings.dynamic_sampling),
        *check_rewards(sample),
        *check_surface_rewards(sample),
        *check_stop_tokens(settings),
        *check_learning_rate(settings),
        *check_bf16(settings),
        *check_memory(settings),
    ]
    n, G = len(sample.truncated), sample.num_generations
    header = f"{n} completions ({n // G} prompts x {G}) sampled from the model before training"
    return DoctorReport(findings, header)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _example(text: str) -> str:
    return repr(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "...")


def check_truncation(sample: RolloutSample) -> list[Finding]:
    n, cut, limit = len(sample.truncated), sum(sample.truncated), sample.max_completion_length
    share = _share(cut, n)
    numbers = {"truncated": cut, "completions": n, "share": share, "max_completion_length": limit}
    what = f"{cut} of {n} completions ({share:.0%}) are cut at max_completion_length={limit} without a stop token"
    if share > MOST:
        fix = (
            f"raise max_completion_length (now {limit}) so answers can finish, or ask for shorter answers in the "
            "prompt: a cut completion rarely reaches its final answer, so its reward says little"
        )
        return [Finding(BLOCKING, "truncation", what, numbers, fix)]
    if share > TRUNCATED_WARN:
        fix = (
            f"raise max_completion_length (now {limit}), or leave cut completions out of the loss "
            "(mask_truncated_completions=True) or penalise them softly (overlong_buffer_len)"
        )
        return [Finding(WARNING, "truncation", what, numbers, fix)]
    return [Finding(INFO, "truncation", what, numbers)]


def check_zero_spread(sample: RolloutSample, dynamic_sampling: bool = False) -> list[Finding]:
    G = sample.num_generations
    varying = varying_groups(group_std(sample.total, G), G)  # (groups,) the rule dynamic sampling drops groups by
    groups, flat = varying.numel(), int((~varying).sum())
    share = _share(flat, groups)
    per_group = sample.total.view(-1, G)  # (groups, G)
    levels = Counter(
        "not scored" if torch.isnan(per_group[g]).all() else f"all {torch.nanmean(per_group[g]).item():.2f}"
        for g in (~varying).nonzero(as_tuple=True)[0].tolist()
    )
    detail = f" ({', '.join(f'{count} {level}' for level, count in levels.most_common(3))})" if flat else ""
    numbers = {"zero_spread_groups": flat, "groups": groups, "share": share}
    what = f"{flat} of {groups} groups ({share:.0%}) have zero reward spread{detail}"
    what += ": their advantages are 0, no learning signal" if flat else ": every group carries a learning signal"
    fix = (
        "set dynamic_sampling=True (drops such groups and samples fresh prompts), use data the model solves "
        "sometimes (easier if its groups all score the minimum, harder if all score the maximum), raise "
        f"num_generations (now {G}), or give partial credit"
    )
    if dynamic_sampling:
        if flat == groups:
            return [Finding(BLOCKING, "zero_spread", what, numbers, "dynamic_sampling finds no group to keep: " + fix)]
        if share > ZERO_SPREAD_WARN:
            rounds = 1 / (1 - share)
            fix = f"dynamic_sampling is on: expect about {rounds:.1f} rollouts per step (max_sampling_rounds caps it)"
            return [Finding(WARNING, "zero_spread", what, numbers, fix)]
        return [Finding(INFO, "zero_spread", what, numbers)]
    if share > MOST:
        return [Finding(BLOCKING, "zero_spread", what, numbers, fix)]
    if share > ZERO_SPREAD_WARN:
        return [Finding(WARNING, "zero_spread", what, numbers, fix)]
    return [Finding(INFO, "zero_spread", what, numbers)]


def check_rewards(sample: RolloutSample) -> list[Finding]:
    """Each function's mean, spread (std) and share of None; the correlation of each pair."""
    findings = []
    n = sample.rewards.size(0)
    for k, name in enumerate(sample.reward_names):
        values = sample.rewards[:, k]  # (N,)
        scored = ~torch.isnan(values)
        none_share = 1 - _share(int(scored.sum()), n)
        if not scored.any():
            what = f"reward {name} returned None for all {n} completions"
            fix = f"check the dataset columns {name} reads and when it returns None; a None reward does not train"
            findings.append(Finding(WARNING, "reward", what, {"name": name, "none_share": 1.0}, fix))
            continue
        mean = torch.nanmean(values).item()
        spread = nanstd(values).item() if scored.sum() > 1 else 0.0
        numbers = {"name": name, "mean": mean, "std": spread, "none_share": none_share}
        what = f"reward {name}: mean {mean:.3f}, spread (std) {spread:.3f}, None on {none_share:.0%} of completions"
        if spread == 0:
            what = f"reward {name} gives {mean:.3f} to every completion it scores (None on {none_share:.0%})"
            fix = "a reward that never varies adds no signal: check that it can tell completions apart"
            findings.append(Finding(WARNING, "reward", what, numbers, fix))
        else:
            findings.append(Finding(INFO, "reward", what, numbers))
    pairs = {}
    for j in range(len(sample.reward_names)):
        for k in range(j + 1, len(sample.reward_names)):
            pair = f"{sample.reward_names[j]}~{sample.reward_names[k]}"
            pairs[pair] = correlation(sample.rewards[:, j], sample.rewards[:, k])
    if pairs:
        shown = ", ".join(f"{pair} {'n/a' if math.isnan(r) else f'{r:+.2f}'}" for pair, r in pairs.items())
        findings.append(Finding(INFO, "correlation", f"reward correlations: {shown}", pairs))
    return findings


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation over the rows both scored; NaN when either is constant there or fewer than 2 rows."""
    both = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[both].double(), y[both].double()
    if x.numel() < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().item() / denominator.item() if denominator > 0 else math.nan


def check_surface_rewards(sample: RolloutSample) -> list[Finding]:
    """Rewards that pay on completions every task metric marks wrong, and pay right ones not clearly more."""
    if sample.task_scores is None or not sample.task_names:
        note = sample.task_note or "no task metrics: set eval_reward_funcs (e.g. [accuracy]) to check this"
        return [Finding(INFO, "surface_reward", f"rewards paying for a surface feature alone: not checked ({note})")]
    scores = sample.task_scores  # (N, M)
    right = (scores.nan_to_num(0.0) > SOLVED).any(dim=1)  # (N,) correct by some task metric
    wrong = ~torch.isnan(scores).all(dim=1) & ~right  # (N,) scored, and correct by none
    names = " and ".join(sample.task_names)
    metrics = names + (" mark" if len(sample.task_names) > 1 else " marks")
    n_wrong = int(wrong.sum())
    if n_wrong == 0:
        what = f"rewards paying for a surface feature alone: not checked (no completion is wrong by {names})"
        return [Finding(INFO, "surface_reward", what, {"wrong": 0})]
    findings = []
    for k, name in enumerate(sample.reward_names):
        values = sample.rewards[:, k]
        paid = wrong & (values.nan_to_num(0.0) > 0)  # (N,)
        share = _share(int(paid.sum()), n_wrong)
        on_wrong = torch.nanmean(values[wrong]).item()
        on_right = torch.nanmean(values[right]).item() if right.any() else math.nan
        numbers = {"name": name, "paid_on_wrong": int(paid.sum()), "wrong": n_wrong, "share": share}
        numbers.update(mean_on_wrong=on_wrong, mean_on_right=on_right)
        what = (
            f"reward {name} pays on {int(paid.sum())} of {n_wrong} completions ({share:.0%}) that {metrics} "
            f"wrong (mean {on_wrong:.2f} on them, {'n/a' if math.isnan(on_right) else f'{on_right:.2f}'} on right ones)"
        )
        # A reward tracking the task pays right answers clearly more than wrong ones; one that does not, while paying
        # wrong ones, pays for something else (NaN: no right answer to compare with, nothing shows it tracks the task)
        finite = values[~torch.isnan(values)]
        value_range = (finite.max() - finite.min()).item() if finite.numel() else 0.0
        tracks_task = on_right > on_wrong and on_right - on_wrong >= SURFACE_GAP * value_range
        if paid.any() and not tracks_task:
            example = sample.texts[int(paid.nonzero()[0])] if sample.texts else ""
            what += f": it pays for a surface feature alone{f', e.g. {_example(example)}' if example else ''}"
            fix = (
                f"pay only for correct answers (gate {name} on {sample.task_names[0]}), add a task reward beside it "
                "with a larger weight, or drop it: the policy can earn it without solving the task"
            )
            findings.append(Finding(WARNING, "surface_reward", what, numbers, fix))
        else:
            findings.append(Finding(INFO, "surface_reward", what, numbers))
    return findings


def check_stop_tokens(settings: RunSettings) -> list[Finding]:
    if not settings.stop_tokens:
        what = "no stop token: every completion runs to max_completion_length"
        fix = "give the tokenizer an eos_token, or the model's generation_config an eos_token_id"
        return [Finding(WARNING, "stop_tokens", what, {"count": 0}, fix)]
    shown = ", ".join(f"{text!r} (id {token_id})" for token_id, text in settings.stop_tokens)
    numbers = {"ids": [token_id for token_id, _ in settings.stop_tokens]}
    return [Finding(INFO, "stop_tokens", f"stop tokens: {shown}", numbers)]


def check_learning_rate(settings: RunSettings) -> list[Finding]:
    lr, (low, high) = settings.learning_rate, LORA_LR_RANGE
    numbers = {"learning_rate": lr}
    typical = f"the typical LoRA GRPO range {low:g} to {high:g}"
    if settings.finetuning == "lora":
        if lr < LORA_LR_FAR_TOO_LOW:
            what = f"learning_rate={lr:g} with LoRA is {low / lr:.0f}x below {typical}: the adapter will barely move"
            fix = f"set learning_rate to {low:g}..{high:g} (1e-6 is DeepSeekMath's rate for full fine-tuning)"
            return [Finding(BLOCKING, "learning_rate", what, numbers, fix)]
        if lr < low:
            what = f"learning_rate={lr:g} with LoRA is below {typical}: learning will be slow"
            return [Finding(WARNING, "learning_rate", what, numbers, f"raise it towards {low:g}..{high:g}")]
        if lr > LORA_LR_TOO_HIGH:
            what = f"learning_rate={lr:g} with LoRA is {lr / high:.0f}x above {typical}: risky (reward collapse)"
            return [Finding(WARNING, "learning_rate", what, numbers, f"lower it to {low:g}..{high:g}")]
        if lr > high:  # small models take more; watch the reward and the KL
            what = (
                f"learning_rate={lr:g} with LoRA: above {typical}, up to {LORA_LR_TOO_HIGH:g} is usual for tiny models"
            )
            return [Finding(INFO, "learning_rate", what, numbers)]
        return [Finding(INFO, "learning_rate", f"learning_rate={lr:g} with LoRA: within {typical}", numbers)]
    if settings.finetuning == "full":
        if lr > FULL_LR_RISKY:
            what = f"learning_rate={lr:g} for full fine-tuning is above {FULL_LR_RISKY:g}: risky, every weight moves"
            fix = "lower it to 1e-6..1e-5 (DeepSeekMath: 1e-6), or train a LoRA adapter"
            return [Finding(WARNING, "learning_rate", what, numbers, fix)]
        return [Finding(INFO, "learning_rate", f"learning_rate={lr:g} for full fine-tuning", numbers)]
    return [Finding(INFO, "learning_rate", f"learning_rate={lr:g} with a {settings.finetuning} adapter", numbers)]


def check_bf16(settings: RunSettings) -> list[Finding]:
    if not (settings.bf16 and settings.on_cpu and not settings.cpu_fast_bf16):
        return []
    what = "bf16=True on a CPU without native bf16 kernels: every matmul is emulated (several times slower than fp32)"
    return [Finding(WARNING, "bf16", what, {"bf16": True}, "set bf16=False (--bf16 false) for CPU runs")]


def check_memory(settings: RunSettings) -> list[Finding]:
    if settings.memory_budget is None or settings.memory_peak is None:
        return []
    peak, budget = settings.memory_peak, settings.memory_budget
    numbers = {"peak": peak, "budget": budget}
    what = (
        f"memory: predicted peak {format_bytes(peak)} ({settings.memory_phase} phase), {memory_verdict(peak, budget)}"
    )
    if peak <= budget:
        return [Finding(INFO, "memory", what, numbers)]
    fix = "`python -m grpo_ext.plan --config X.yaml --gpu-memory ...` lists the changes predicted to fit"
    return [Finding(WARNING, "memory", what, numbers, fix)]


# --- Sampling the rollouts through a trainer ---


def log_preflight(trainer, steps: int) -> None:
    """`doctor_steps`: the pre-flight check's report and verdict logged at the start of training (a warning when
    something needs a look). A failing check is a warning too: it must never stop the run it checks."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:  # weights are sharded only once train() prepares them
        logger.warning(
            "doctor_steps: the pre-flight check does not run under DeepSpeed / FSDP; run "
            "`python -m grpo_ext.doctor --config X.yaml` on one process instead."
        )
        return
    try:
        report = preflight(trainer, steps)
    except Exception as error:
        logger.warning(
            f"doctor_steps: the pre-flight check failed ({type(error).__name__}: {error}); training goes on."
        )
        return
    if trainer.accelerator.is_main_process:
        logger.log(logging.WARNING if report.needs_attention else logging.INFO, "%s", report.text())


def preflight(trainer, steps: int = 2, gpu_memory: str | int | None = None) -> DoctorReport:
    """Sample `steps` generation batches of `trainer`'s model, as it is now, on training prompts, and diagnose them
    with the trainer's settings. `gpu_memory` (e.g. "8GiB") is the memory check's budget (default: the config's
    `gpu_memory_budget`; none: not checked). Nothing is trained: no gradient, and the model's mode and the random
    state are put back."""
    if steps < 1:
        raise ValueError(f"steps={steps}: the pre-flight check needs at least 1 batch (doctor_steps / --steps >= 1).")
    if getattr(trainer, "_tool_calling", None) is not None:
        raise ValueError(
            "The pre-flight check samples single-turn rollouts: with tools or an environment_factory it is not "
            "supported yet. Set doctor_steps=0."
        )
    sample = sample_rollouts(trainer, steps)
    return diagnose(sample, run_settings(trainer, gpu_memory))


def training_rows(dataset, count: int, seed: int) -> list[dict]:
    """`count` rows of the train set: drawn at random (seeded), without repeats while the set has enough, from a
    map-style set; the first rows, repeated if too few, of a stream."""
    if isinstance(dataset, IterableDataset):
        rows = first_rows(dataset, count)
        if not rows:
            raise ValueError("train_dataset is empty: the pre-flight check has no prompt to sample.")
        return [rows[i % len(rows)] for i in range(count)]
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty: the pre-flight check has no prompt to sample.")
    rng = random.Random(seed)
    if count <= len(dataset):
        indices = rng.sample(range(len(dataset)), count)
    else:
        indices = [rng.randrange(len(dataset)) for _ in range(count)]
    return [dataset[i] for i in indices]


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def sample_rollouts(trainer, steps: int) -> RolloutSample:
    """`steps` batches of `generation batch / G` prompts (this process's share), each repeated G times in a row,
    generated by `trainer._generate` in train mode without gradient, scored by the trainer's rewards and task
    metrics."""
    args, G = trainer.args, trainer.num_generations
    prompts_per_batch = max(args.per_device_train_batch_size * args.steps_per_generation // G, 1)
    rows = training_rows(trainer.train_dataset, steps * prompts_per_batch, args.seed)
    task_metrics, task_note = trainer.task_metrics, ""
    if task_metrics is None:
        task_note = "no task metrics: set eval_reward_funcs (e.g. [accuracy]) to check this"
    else:
        missing = {
            name: [column for column in columns if column not in rows[0]]
            for name, columns in task_metrics.required_columns().items()
        }
        missing = {name: columns for name, columns in missing.items() if columns}
        if missing:
            task_metrics = None
            task_note = "; ".join(f"task metric {n} needs column(s) {', '.join(c)}" for n, c in missing.items())
            task_note += ", which the train set lacks"
    model, batches = trainer.model, []
    was_training = model.training
    model.train()  # as in a training rollout (`_generate` reads the mode for the group size)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(trainer.accelerator.device)):
            for start in range(0, len(rows), prompts_per_batch):
                batches.append(_roll_out(trainer, rows[start : start + prompts_per_batch], task_metrics))
    finally:
        model.train(was_training)
    completion_ids = [ids for batch in batches for ids in batch["completion_ids"]]
    rewards = torch.cat([batch["rewards"] for batch in batches])  # (N, K)
    return RolloutSample(
        reward_names=list(trainer.rewards.names),
        rewards=rewards,
        total=trainer.rewards.weighted_sum(rewards),
        num_generations=G,
        truncated=torch.cat([batch["truncated"] for batch in batches]).tolist(),
        max_completion_length=args.max_completion_length,
        texts=trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True),
        task_names=list(task_metrics.names) if task_metrics is not None else [],
        task_scores=torch.cat([batch["task_scores"] for batch in batches]) if task_metrics is not None else None,
        task_note=task_note,
    )


def _roll_out(trainer, rows: list[dict], task_metrics) -> dict:
    """One generation batch: completions, their truncation flags, rewards `(B, K)` and task scores `(B, M)`."""
    rows = [row for row in rows for _ in range(trainer.num_generations)]  # each prompt G times in a row
    prompts = [row["prompt"] for row in rows]
    prompt_ids, completion_ids, _, completions, _, extra_fields, *_ = trainer._generate(prompts)
    # The stop rule of training rollouts: cut when the last token is not a stop token
    truncated = Rollout.of_token_lists(
        prompt_ids, completion_ids, None, trainer.processing_class.pad_token_id, trainer.eos_token_ids
    ).is_truncated.cpu()
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}  # as `generate_and_score`
    columns["trainer_state"] = trainer.state
    for key, values in extra_fields.items():  # a rollout_func's extra fields: a list holds one value per row
        columns[key] = values if isinstance(values, list) else [values] * len(rows)
    batch = {
        "completion_ids": completion_ids,
        "truncated": truncated,
        "rewards": trainer.rewards.score(prompts, completions, completion_ids, columns),
    }
    if task_metrics is not None:
        batch["task_scores"] = task_metrics.score(prompts, completions, completion_ids, columns)
    return batch


def run_settings(trainer, gpu_memory: str | None = None) -> RunSettings:
    """The settings of the checks, read from the trainer: learning rate, LoRA or not, stop tokens, bf16, memory."""
    args = trainer.args
    peft_configs = getattr(unwrap_distributed(trainer.model), "peft_config", None)
    peft_config = next(iter(peft_configs.values()), None) if isinstance(peft_configs, dict) else None
    if peft_config is None:
        finetuning = "full"
    else:
        peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        finetuning = "lora" if peft_type == "LORA" else str(peft_type)
    tokenizer = trainer.processing_class
    settings = RunSettings(
        learning_rate=args.learning_rate,
        finetuning=finetuning,
        stop_tokens=[(token_id, tokenizer.decode([token_id])) for token_id in trainer.eos_token_ids],
        bf16=bool(args.bf16),
        on_cpu=trainer.accelerator.device.type == "cpu",
        cpu_fast_bf16=cpu_has_fast_bf16(),
        dynamic_sampling=args.dynamic_sampling,
    )
    budget = gpu_memory or args.gpu_memory_budget
    if budget is not None:
        causal_lm = unwrap_causal_lm(trainer.model)
        lora = peft_config if finetuning == "lora" else None
        in_4bit = getattr(causal_lm, "is_loaded_in_4bit", False)
        plan = plan_step(*run_step_inputs(args, causal_lm.config, lora, in_4bit))
        settings.memory_peak, settings.memory_phase = plan.peak, plan.peak_phase
        settings.memory_budget = parse_memory(budget)
    return settings


# --- The command line ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_ext.doctor",
        description="Pre-flight check of a recipe: will this GRPO run learn? Samples a few rollouts of the untrained "
        "model and prints a report ending in one verdict. Exit status: 0 ready, 1 will not learn, 2 usage error.",
        epilog="Any other --field value overrides the recipe YAML, as for recipes/deepseek_math_style.py.",
    )
    parser.add_argument("--config", required=True, help="a recipe YAML (recipes/configs/*.yaml)")
    parser.add_argument("--steps", type=int, default=2, help="generation batches to sample (default 2)")
    parser.add_argument("--gpu-memory", help="the GPU's memory, e.g. 8GiB: the memory planner's verdict too")
    cli, overrides = parser.parse_known_args(argv)
    if cli.steps < 1:
        parser.error(f"--steps {cli.steps}: sample at least 1 batch (2 is the default).")
    try:
        budget = parse_memory(cli.gpu_memory) if cli.gpu_memory else None
    except ValueError as error:
        parser.error(f"--gpu-memory: {error}")

    # The recipe's set-up, imported here: it imports the trainer, which imports this module when it runs the check
    from .recipe import build_trainer, parse_recipe_args

    try:
        trainer, _ = build_trainer(*parse_recipe_args(["--config", cli.config, *overrides]))
    except (OSError, TypeError, ValueError) as error:  # a missing file, a wrong value: named by the error
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 - the command line's output
        return 2
    report = preflight(trainer, cli.steps, budget)
    print(report.text())  # noqa: T201 - the command line's output
    return 0 if report.ready else 1


if __name__ == "__main__":
    raise SystemExit(main())
