"""The step's metrics under TRL's names: collected per micro-batch and rollout, averaged at each log.

`rollout` records the rewards, their spread and the completion lengths of one rollout; `objective` the KL, entropy,
the loss type's own metrics and PPO's clip ratios of one micro-batch. A token mean (`token_mean`: kl, entropy, clip
ratios) is summed over all processes with its token count, and `means` weights each micro-batch by its tokens, so a
logged value is the token mean over everything since the last log, whatever the micro-batch and process split.
Everything else is a plain mean of what was recorded since the last log.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch
from accelerate.utils import gather, gather_object
from trl.trainer.utils import strip_images_from_messages

from .advantages import nanstd

__all__ = ["MetricsRecorder"]


class MetricsRecorder:
    """Metrics of one trainer, per mode ("train" / "eval"): `values[mode][name]` is the list recorded since the last
    log (`trl.GRPOTrainer._metrics`, which the trainer exposes under that name too)."""

    def __init__(self, accelerator, logs_size: int | None = None):
        self.accelerator = accelerator
        self.values = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.tokens = {"train": defaultdict(list), "eval": defaultdict(list)}  # behind each token-mean value
        self.samples: dict[str, list] = {}  # the last rollout's completions table (log_completions)
        # `trl.GRPOTrainer._logs`, which the trainer exposes under that name: the last `logs_size` rows rolled out
        # (a generation batch), of all processes, kept whether or not completions are logged ("images" stays empty)
        self.logs = {
            "images": deque(maxlen=logs_size),
            "prompt": deque(maxlen=logs_size),
            "completion": deque(maxlen=logs_size),
            "rewards": defaultdict(lambda: deque(maxlen=logs_size)),
            "advantages": deque(maxlen=logs_size),
            "extra": defaultdict(lambda: deque(maxlen=logs_size)),
        }

    def add(self, mode: str, name: str, value: float) -> None:
        self.values[mode][name].append(value)

    def token_mean(self, mode: str, names: list[str], values: torch.Tensor, mask: torch.Tensor) -> None:
        """Record the token mean of `values` over `mask` on all processes, and the token count it is over."""
        totals = torch.stack([(values * mask).sum(), mask.sum()]).float()
        total, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        for name in names:
            self.values[mode][name].append(total / max(count, 1.0))
            self.tokens[mode][name].append(count)

    def means(self, mode: str) -> dict[str, float]:
        """Each metric's mean since the last call (token means weighted by their tokens); then forgets them."""
        metrics = {}
        for key, values in self.values[mode].items():
            tokens = self.tokens[mode].get(key)
            if tokens and sum(tokens) > 0:
                metrics[key] = sum(v * n for v, n in zip(values, tokens, strict=True)) / sum(tokens)
            elif values:
                metrics[key] = sum(values) / len(values)
        self.values[mode].clear()
        self.tokens[mode].clear()
        return metrics

    def rollout(self, mode, reward_names, rewards_per_func, rewards, std, rollout) -> int:
        """Rewards `(N, K)` / `(N,)` of all processes, the group spread `std` and this process's `rollout` lengths.
        Returns the tokens (prompt and completion) this rollout added on all processes."""
        metrics = self.values[mode]
        for k, name in enumerate(reward_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, k]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, k]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        is_std_zero = torch.isclose(std, torch.zeros_like(std))
        metrics["frac_reward_zero_std"].append(is_std_zero.float().mean().item())
        lengths, truncated = gather(rollout.generated_lengths).float(), gather(rollout.is_truncated)  # (N,) each
        terminated = lengths[~truncated] if not truncated.all() else torch.zeros(1)  # ended with a stop token
        for kind, values in (("", lengths), ("terminated_", terminated)):
            for stat in ("mean", "min", "max"):  # completions/mean_length, ..., completions/max_terminated_length
                metrics[f"completions/{stat}_{kind}length"].append(getattr(values, stat)().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
        return int(gather(rollout.prompt_mask.sum() + rollout.generated_lengths.sum()).sum())

    def objective(self, mode, terms, entropies, completion_mask) -> None:
        """One micro-batch's loss terms (`objective.LossTerms`), entropies and mask `(B, C)`."""
        mask = completion_mask.float()
        if terms.per_token_kl is not None:
            self.token_mean(mode, ["kl", "penalty/objective_kl"], terms.per_token_kl.detach(), mask)
        self.token_mean(mode, ["entropy"], entropies, mask)
        for name, values in terms.metrics.items():  # the loss type's own (cispo_clip_ratio, vespo/phi_seq_mean)
            values = values.detach().float()
            self.token_mean(mode, [name], values, mask if values.size(-1) > 1 else torch.ones_like(values))
        if terms.is_low_clipped is None:  # a loss type without PPO's clip: no clip_ratio/*
            return
        if terms.ratio.size(-1) == 1:  # sequence-level ratio: every token of a sequence shares its clipping
            mask = torch.ones_like(terms.ratio)
        low, high = terms.is_low_clipped.float(), terms.is_high_clipped.float()
        self.token_mean(mode, ["clip_ratio/low_mean"], low, mask)
        self.token_mean(mode, ["clip_ratio/high_mean"], high, mask)
        self.token_mean(mode, ["clip_ratio/region_mean"], torch.maximum(low, high), mask)

        def per_sequence(clipped):  # (B,) each sequence's share of clipped tokens
            return (clipped * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

        self.values[mode]["clip_ratio/low_min"].append(gather(per_sequence(low)).min().item())
        self.values[mode]["clip_ratio/high_max"].append(gather(per_sequence(high)).max().item())

    def keep_logs(self, prompts, completions, reward_names, rewards_per_func, advantages, extra) -> None:
        """Append one rollout to `logs` as TRL appends to `_logs`: this process's prompts and completions (as the
        reward functions received them) with the other processes', each function's rewards `(N, K)` (NaN where it
        returned None), the advantages `(N,)` and the `log_extra` columns (already all processes' rows)."""
        self.logs["prompt"].extend(gather_object(prompts))
        self.logs["completion"].extend(gather_object(completions))
        for k, name in enumerate(reward_names):
            self.logs["rewards"][name].extend(rewards_per_func[:, k].tolist())
        self.logs["advantages"].extend(advantages.tolist())
        for column, values in extra.items():
            self.logs["extra"][column].extend(values)

    def keep_samples(self, step, prompts, texts, reward_names, rewards_per_func, rewards, advantages, extra) -> None:
        """The completions table of this rollout (all processes' rows; `log_completions`), logged at the next log."""
        self.samples = {
            "step": [step] * rewards.numel(),
            "prompt": [str(strip_images_from_messages(p)) for p in gather_object(prompts)],  # image parts named only
            "completion": gather_object(texts),
            **{name: rewards_per_func[:, k].tolist() for k, name in enumerate(reward_names)},
            **extra,
            "reward": rewards.tolist(),
            "advantage": advantages.tolist(),
        }
