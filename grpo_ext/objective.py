"""The GRPO objective: KL estimator, clipped surrogate, GSPO sequence ratio and loss aggregation.

Pure functions of tensors; nothing here knows about models or trainers. Formulas: DeepSeekMath (arXiv 2402.03300)
eq. 3-4, DAPO (arXiv 2503.14476), Dr. GRPO (arXiv 2503.20783), GSPO (arXiv 2507.18071); see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def per_token_kl(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Schulman's estimators of KL(pi || pi_ref) from tokens sampled from pi (http://joschu.net/blog/kl-approx.html).

    With log r = ref_logp - logp:
    - k1 = -log r                 unbiased, can be negative per token (the plain log-ratio; PPO-RLHF's reward KL)
    - k2 = (log r)^2 / 2          biased, >= 0, low variance
    - k3 = exp(log r) - log r - 1 unbiased, >= 0 (DeepSeekMath's loss term)
    """
    log_ratio = ref_per_token_logps - per_token_logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return log_ratio**2 / 2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}.")


def log_importance_weights(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    level: str = "token",
) -> torch.Tensor:
    """log rho: per token `(B, C)`, or GSPO's length-normalised sequence value `(B, 1)` for level="sequence"."""
    log_ratio = per_token_logps - old_per_token_logps  # (B, C)
    if level == "token":
        return log_ratio
    if level == "sequence":
        lengths = completion_mask.sum(-1).clamp(min=1.0)  # (B,)
        return ((log_ratio * completion_mask).sum(-1) / lengths).unsqueeze(-1)  # (B, 1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}.")


@dataclass
class ObjectiveTerms:
    """Per-token pieces of the GRPO loss, kept for aggregation and logging."""

    per_token_loss: torch.Tensor  # (B, C), or (B, 1) at sequence level with beta == 0
    per_token_kl: torch.Tensor | None  # (B, C)
    ratio: torch.Tensor  # (B, C) or (B, 1)
    is_low_clipped: torch.Tensor  # bool, same shape as ratio
    is_high_clipped: torch.Tensor


def grpo_per_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
) -> ObjectiveTerms:
    """L_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL_t, before aggregation over tokens.

    KL_t is k3 by default (DeepSeekMath eq. 4); `kl_estimator` picks k1 or k2 instead.
    """
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1)
    ratio = torch.exp(
        log_importance_weights(per_token_logps, old_per_token_logps, completion_mask, importance_sampling_level)
    )
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    policy_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = None
    per_token_loss = policy_loss
    if beta != 0.0:
        kl = per_token_kl(per_token_logps, ref_per_token_logps, kl_estimator)
        per_token_loss = policy_loss + beta * kl
    return ObjectiveTerms(
        per_token_loss=per_token_loss,
        per_token_kl=kl,
        ratio=ratio,
        is_low_clipped=(ratio < 1 - epsilon_low) & (advantages < 0),
        is_high_clipped=(ratio > 1 + epsilon_high) & (advantages > 0),
    )


@dataclass(frozen=True)
class Normalisers:
    """What a loss type may divide by: counts over the window of micro-batches one optimizer step accumulates."""

    num_sequences: float  # completions in the window, this process
    num_tokens: float  # completion tokens in the window, this process
    num_global_tokens: float  # completion tokens in the window on all processes / number of processes (DDP averages)
    max_completion_length: int


def _grpo(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    sequence_means = masked_loss.sum(-1) / completion_mask.sum(-1).clamp(min=1.0)  # (B,)
    return sequence_means.sum() / n.num_sequences


def _dapo(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / max(n.num_global_tokens, 1.0)


def _bnpo(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / max(n.num_tokens, 1.0)


def _dr_grpo(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / (n.num_sequences * n.max_completion_length)


# Every loss type: its name (config's `loss_type`) -> this micro-batch's share of the window's loss, from the masked
# token losses `(B, C)`. Summed over the window's micro-batches:
#   grpo:    1/N sum_i 1/|o_i| sum_t L_it     (DeepSeekMath: mean over tokens, then over completions)
#   dapo:    sum_it L_it / sum_i |o_i|        (DAPO: token mean over the global batch)
#   dr_grpo: sum_it L_it / (N * max_completion_length)   (Dr. GRPO: no length bias)
#   bnpo:    sum_it L_it / sum_i |o_i|        (token mean over this process's batch)
# Adding a loss type: a function here, its entry and line above, and a closed-form case in tests/test_objective.py.
LOSS_TYPES: dict[str, Callable[[torch.Tensor, torch.Tensor, Normalisers], torch.Tensor]] = {
    "grpo": _grpo,
    "dapo": _dapo,
    "dr_grpo": _dr_grpo,
    "bnpo": _bnpo,
}


def aggregate_loss(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: str,
    num_sequences: float,
    num_tokens: float,
    max_completion_length: int,
    num_global_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce token losses `(B, C)` to this micro-batch's share of the loss of its optimisation window, by
    `LOSS_TYPES[loss_type]`. The counts are those of the whole window the gradient is accumulated over;
    `num_global_tokens` (for `dapo`) defaults to `num_tokens`, right for one process."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}.")
    normalisers = Normalisers(
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        num_global_tokens=num_tokens if num_global_tokens is None else num_global_tokens,
        max_completion_length=max_completion_length,
    )
    return LOSS_TYPES[loss_type](per_token_loss * completion_mask, completion_mask, normalisers)
