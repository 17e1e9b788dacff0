"""Reward-side penalties: KL folded into the reward, DAPO's soft overlong penalty, a missing-EOS penalty, and the
adaptive KL coefficient of Ziegler et al. 2019.

    r~_i = r_i - beta_r * sum_t KL_t(pi_old || pi_ref) - overlong_i - missing_eos_i      (before group normalisation)

This is the reward half of DeepSeekMath's "dual penalty"; the objective half is `beta` in objective.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from trl.rewards import get_soft_overlong_punishment

from .objective import per_token_kl


def sequence_kl(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, completion_mask: torch.Tensor, estimator: str
) -> torch.Tensor:
    """sum_t KL_t over each completion's tokens `(B,)`: the KL penalty one completion earns."""
    return (per_token_kl(per_token_logps, ref_per_token_logps, estimator) * completion_mask).sum(-1)


def overlong_penalty(lengths: torch.Tensor, max_completion_length: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) as a non-negative penalty `(B,)`.

    0 up to L_max - L_cache tokens, then rising linearly to `factor` at L_max (and staying there beyond it):
    `-factor * R_length`, with R_length from TRL's `get_soft_overlong_punishment`, the formula's one implementation
    here (the `soft_overlong` reward function uses it too).
    """
    r_length = get_soft_overlong_punishment(max_completion_length, buffer_len)
    lengths_as_ids = [range(n) for n in lengths.tolist()]  # it reads only len() of each completion
    return -factor * torch.tensor(r_length(lengths_as_ids), dtype=torch.float32, device=lengths.device)


def missing_eos_penalty(is_truncated: torch.Tensor, penalty: float) -> torch.Tensor:
    """`penalty` for completions cut at max_completion_length without an EOS, 0 for the others `(B,)`."""
    return penalty * is_truncated.float()


def reward_penalties(
    args, rollout, rollout_per_token_logps, reward_kl_coef: float, gather
) -> tuple[torch.Tensor, dict]:
    """The penalties `args` asks for, summed per completion of this process `(B,)`, and each one's mean over all
    processes (`gather` collects a `(B,)` tensor from every process) under its metric name: `penalty/reward_kl`
    (with `penalty/reward_kl_coef`), `penalty/overlong`, `penalty/missing_eos`."""
    lengths = rollout.lengths  # (B,)
    penalty, means = torch.zeros(lengths.size(0), device=lengths.device), {}  # (B,)
    if args.reward_kl_coef > 0:
        kl = sequence_kl(rollout_per_token_logps, rollout.ref_per_token_logps, rollout.loss_mask, args.reward_kl_estimator)  # fmt: skip
        penalty = penalty + reward_kl_coef * kl
        means["penalty/reward_kl"], means["penalty/reward_kl_coef"] = gather(kl).mean().item(), reward_kl_coef
    if args.overlong_buffer_len is not None:
        overlong = overlong_penalty(lengths, args.max_completion_length, args.overlong_buffer_len, args.overlong_penalty_factor)  # fmt: skip
        penalty = penalty + overlong
        means["penalty/overlong"] = gather(overlong).mean().item()
    if args.missing_eos_penalty is not None:
        missing_eos = missing_eos_penalty(rollout.is_truncated, args.missing_eos_penalty)  # (B,)
        penalty = penalty + missing_eos
        means["penalty/missing_eos"] = gather(missing_eos).mean().item()
    return penalty, means


@dataclass
class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2) for beta_r.

    e_t = clip(KL_t / target - 1, -0.2, 0.2);  beta_{t+1} = beta_t * (1 + e_t * n_t / horizon),
    with KL_t the mean per-completion KL of the rollout and n_t the number of completions in it.
    """

    value: float
    target: float
    horizon: float

    def update(self, measured_kl: float, num_samples: int) -> float:
        proportional_error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * num_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
