"""Checks every process agrees on: never a NaN update, never a NaN checkpoint (the loss is checked before the optimizer
steps on it, the trainable weights after each optimizer step and before each checkpoint, and all processes stop
together), and `gather_1d` for values whose count differs across processes."""

from __future__ import annotations

import torch
from torch import nn


def nonfinite_trainable_weights(model: nn.Module) -> list[str]:
    """Names of trainable parameters holding a NaN / inf on this process (empty when all are finite)."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.numel() and not bool(torch.isfinite(parameter.detach()).all())
    ]


class FiniteGuard:
    """Remembers the last optimizer step after which every trainable weight was finite, to name the one that broke."""

    def __init__(self):
        self.last_finite_step = 0

    @staticmethod
    def check_loss(loss: torch.Tensor, accelerator, step: int) -> None:
        """Stop before the optimizer steps on a NaN / infinite loss of `step` (on any process)."""
        nonfinite = accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "max")
        if bool(nonfinite.item()):
            raise FloatingPointError(
                f"The loss of step {step} is {loss.item()} (on this or another process); stopped before the optimizer "
                "step, so the weights are still those of the previous step. Rewards are checked for NaN / inf already "
                "(nonfinite_rewards), so look at the learning rate (lower it), bf16 / fp16 overflow, or max_grad_norm."
            )

    def check_weights(self, model: nn.Module, accelerator, step: int, action: str) -> None:
        """Raise, refusing to `action`, if any process holds a non-finite trainable weight after `step`."""
        bad = nonfinite_trainable_weights(model)
        anywhere = accelerator.reduce(torch.tensor([float(bool(bad))], device=accelerator.device), "max")
        if not bool(anywhere.item()):
            self.last_finite_step = step
            return
        listed = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else " on another process"
        raise FloatingPointError(
            f"Refusing to {action}: trainable weights are NaN / infinite{listed} after step {step}; "
            f"they were finite after step {self.last_finite_step}, so step {self.last_finite_step + 1} went wrong. "
            "Resume from an earlier checkpoint with a lower learning rate (or max_grad_norm), and check the reward "
            "functions (nonfinite_rewards='error' names NaN / inf rewards)."
        )


def gather_1d(accelerator, values: torch.Tensor) -> torch.Tensor:
    """The 1-D `values` of every process, concatenated (lengths may differ across processes)."""
    if accelerator.num_processes == 1:
        return values
    pad = -1e9  # below every value gathered here (entropies): marks padding
    gathered = accelerator.gather(accelerator.pad_across_processes(values, dim=0, pad_index=pad))
    return gathered[gathered != pad]
