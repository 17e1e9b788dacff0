"""The reference policy pi_ref of the KL term, held as cheaply as the model allows.

- `disabled_adapter`: a PEFT model with its adapters switched off is the base model: no second copy of the weights.
- `copy`: a frozen deep copy, for full fine-tuning with beta > 0 (what TRL does too).
- `none`: no KL anywhere (beta == 0 and reward_kl_coef == 0): no reference pass at all.
(Snapshot adapters refreshed every N steps come with the issue "Reference snapshots".)
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager, nullcontext

from torch import nn

logger = logging.getLogger(__name__)

REFERENCE_MODES = ("disabled_adapter", "copy", "none")


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ReferencePolicy:
    def __init__(self, mode: str, model: nn.Module | None = None):
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}.")
        self.mode = mode
        self.model = model  # the frozen copy in `copy` mode, else None

    @classmethod
    def for_policy(cls, policy: nn.Module, needed: bool) -> ReferencePolicy:
        """The cheapest reference for this policy: none when no KL needs it, disabled adapters for PEFT, else a copy."""
        if not needed:
            reference = cls("none")
        elif _is_peft_model(policy):
            reference = cls("disabled_adapter")
        else:
            frozen = copy.deepcopy(policy).eval().requires_grad_(False)
            reference = cls("copy", frozen)
        logger.info("Reference policy: %s (%s)", reference.mode, reference.memory_note())
        return reference

    def memory_note(self) -> str:
        if self.model is None:
            return "no extra weights"
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return f"{size / 2**20:.1f} MiB of frozen weights"

    @contextmanager
    def activate(self, policy: nn.Module):
        """Yield the module whose forward pass is pi_ref."""
        if self.mode == "none":
            raise RuntimeError("There is no reference policy when beta == 0 and reward_kl_coef == 0.")
        if self.mode == "copy":
            yield self.model
            return
        unwrapped = getattr(policy, "module", policy)
        with unwrapped.disable_adapter() if _is_peft_model(unwrapped) else nullcontext():
            yield policy
