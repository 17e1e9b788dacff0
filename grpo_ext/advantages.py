"""Group-relative advantages (DeepSeekMath, arXiv 2402.03300, section 4.1.2 outcome supervision).

A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4), the same value for every token of completion i.
"""

from __future__ import annotations

import torch

STD_EPSILON = 1e-4  # as in TRL, so advantages match trl.GRPOTrainer on the same rewards


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
    """
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    group_mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)  # (N,)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    advantages = rewards - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), std
