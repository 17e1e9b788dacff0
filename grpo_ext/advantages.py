"""Group-relative advantages (DeepSeekMath, arXiv 2402.03300, section 4.1.2 outcome supervision).

A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4), the same value for every token of completion i.

With several reward functions, `multi_objective_aggregation` says where the weighted sum happens:
- `sum_then_normalize`: r_i = sum_k w_k r_ik, then the advantage above (`group_relative_advantages`);
- `normalize_then_sum` (GDPO, arXiv 2601.05242): each function's rewards normalised within their group first
  (`group_normalized_rewards`), then the weighted sum, then normalised over the batch (`batch_normalized_advantages`).
"""

from __future__ import annotations

import torch

STD_EPSILON = 1e-4  # as in TRL, so advantages match trl.GRPOTrainer on the same rewards
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def check_advantage_settings(args) -> None:
    """A config's `multi_objective_aggregation` is one this module computes (run by `settings.check_settings`)."""
    if args.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation={args.multi_objective_aggregation!r} is not one of "
            f"{MULTI_OBJECTIVE_AGGREGATIONS}."
        )


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation that ignores NaN (a reward function that returned None)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=dim is not None)
    squared = torch.nansum((values - mean) ** 2, dim=dim, keepdim=dim is not None)
    return torch.sqrt(squared / (count - 1))


def group_relative_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages `(N,)` for rewards `(N,)` laid out as consecutive groups of `num_generations`.

    Returns the advantages and the std they were scaled by `(N,)` (group or batch std, for logging
    `frac_reward_zero_std`). NaN rewards (unscorable completions) are left out of the statistics and get advantage 0.
    A group of one (evaluation with `num_generations_eval=1`) has std 0, as in TRL.
    """
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    group_mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    std = batch_std(rewards) if scale_rewards == "batch" else group_std(rewards, num_generations)  # (N,)
    advantages = rewards - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), std


def batch_std(rewards: torch.Tensor) -> torch.Tensor:
    """Std of all the rewards, for each completion `(N,)` (0 for a batch of one)."""
    return nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)


def group_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Std of each completion's group rewards `(N,)` (0 for a group of one): whether a group's rewards vary."""
    if num_generations == 1:
        return torch.zeros_like(rewards)
    return nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)  # (N,)


def group_normalized_rewards(rewards_per_func: torch.Tensor, num_generations: int) -> torch.Tensor:
    """GDPO's decoupled normalisation: each function's rewards `(N, K)` as (r_ik - mean_group) / (std_group + 1e-4)
    within their group of `num_generations`, `(N, K)`. NaN (a function that returned None) stays NaN and is left out
    of its group's statistics; a group with one scored value gets NaN (its std is undefined), as in TRL."""
    num_funcs = rewards_per_func.size(1)
    grouped = rewards_per_func.view(-1, num_generations, num_funcs)  # (N/G, G, K)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # (N/G, 1, K)
    std = nanstd(grouped, dim=1) if num_generations > 1 else torch.zeros_like(mean)  # (N/G, 1, K)
    return ((grouped - mean) / (std + STD_EPSILON)).view(-1, num_funcs)  # (N, K)


def batch_normalized_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean_batch(r)) / (std_batch(r) + 1e-4), `(N,)`, and the batch std `(N,)`: the last step of
    `normalize_then_sum`. NaN rewards are left out of the statistics and get advantage 0."""
    std = batch_std(rewards)  # (N,)
    advantages = (rewards - torch.nanmean(rewards)) / (std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), std
