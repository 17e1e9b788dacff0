"""The reference policy pi_ref of the KL terms, held as cheaply as the model allows.

- `disabled_adapter`: a PEFT model with its adapters switched off is the base model: no second copy of the weights.
- `snapshot_adapter`: a frozen copy of the policy's adapter, refreshed every `ref_model_sync_steps` optimizer steps:
  DeepSeekMath's iterative RL resets the reference to the current policy (arXiv 2402.03300, section 4.1.3); with an
  adapter that reset costs an adapter, not a model. Works on 4-bit bases.
- `copy`: a frozen deep copy, for full fine-tuning with a KL term (what TRL does too).
- `none`: no KL anywhere (beta == 0 and reward_kl_coef == 0): no reference pass at all.

TR-DPO's soft update (arXiv 2404.09656, `sync_ref_model`): every `ref_model_sync_steps` steps
pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref, weight by weight. A reference with weights of its own can be mixed:
the copy (every weight) and the snapshot adapter (the adapter's weights; for LoRA that mixes A and B, not the product
B A). The disabled adapter has none: mixing it would need a second copy of the base model.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.models.utils import prepare_deepspeed

from .cpu import trains_on_cpu
from .models import cast_lm_head_to_fp32, load_causal_lm, unwrap_distributed

REFERENCE_MODES = ("auto", "disabled_adapter", "snapshot_adapter", "copy", "none")
MIXABLE_MODES = ("snapshot_adapter", "copy")  # references with weights of their own, for `sync(alpha < 1)`
SNAPSHOT_ADAPTER = "reference"  # name of the frozen adapter in snapshot mode (saved in checkpoints as a subfolder)


def check_reference_settings(args) -> None:
    """A config's `ref_model_mode` is one of `REFERENCE_MODES`, and one that can be mixed with the policy when
    `sync_ref_model` is on (run by `settings.check_settings`, at trainer start, before `ReferencePolicy.build`)."""
    if args.ref_model_mode not in REFERENCE_MODES:
        raise ValueError(f"ref_model_mode={args.ref_model_mode!r} is not one of {REFERENCE_MODES}.")
    if args.sync_ref_model and args.ref_model_mode not in (*MIXABLE_MODES, "auto"):
        raise ValueError(
            f"sync_ref_model=True mixes the policy's weights into the reference's, and ref_model_mode="
            f"{args.ref_model_mode!r} has no reference weights of its own (the base model under the disabled adapter "
            "would need a second copy). Use ref_model_mode='snapshot_adapter' with a PEFT adapter, 'copy' for full "
            "fine-tuning, or 'auto' (picks one of them)."
        )


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _adapter_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """LoRA-style parameters of one adapter, keyed by their name with the adapter name removed."""
    marker = f".{adapter}."
    return {name.replace(marker, "."): p for name, p in model.named_parameters() if marker in name}


def load_reference_copy(
    model_path: str, model_init_kwargs: dict | None, quantization_config=None, on_cpu: bool | None = None
) -> nn.Module:
    """pi_ref under ZeRO-3: loaded again from where the policy came from (its weights are partitioned already), in
    the policy's dtype (`on_cpu` as the policy was loaded)."""
    if not model_path:
        raise ValueError(
            "Under DeepSpeed ZeRO-3 the frozen reference is loaded again from the policy's path, and this model "
            "was built in memory: pass the model as an id or path, or use a PEFT adapter (reference = adapters off)."
        )
    model_init_kwargs = dict(model_init_kwargs or {})
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    return load_causal_lm(model_path, model_init_kwargs, on_cpu)


class ReferencePolicy:
    def __init__(self, mode: str, model: nn.Module | None = None):
        self.mode = mode
        self.model = model  # the frozen copy in `copy` mode, else None
        self.active_adapter = None  # the trained adapter, in snapshot mode

    @classmethod
    def build(
        cls,
        policy: nn.Module,
        mode: str = "auto",
        needed: bool = True,
        load_copy=None,
        partitioned: bool = False,
        mixed: bool = False,
    ) -> ReferencePolicy:
        """The reference for `mode`; `auto` picks the cheapest: none when no KL needs it, disabled adapters for PEFT
        (the snapshot adapter when `mixed`), else a frozen copy. Raises when the mode cannot serve this policy, saying
        what to use instead.

        `load_copy`: builds the frozen copy instead of `copy.deepcopy(policy)` (DeepSpeed ZeRO-3 partitions weights at
        load time, so a deep copy would copy empty shards). `partitioned`: the weights are sharded across processes.
        `mixed`: the reference will be mixed with the policy (`sync_ref_model`), so it needs weights of its own. The
        mode's name, and whether it can be mixed, are a config's to check (`check_reference_settings`, at trainer start).
        """
        is_peft = _is_peft_model(policy)
        if mode == "auto":
            peft_mode = "snapshot_adapter" if mixed else "disabled_adapter"
            mode = "none" if not needed else peft_mode if is_peft else "copy"
        if mixed and partitioned:
            raise ValueError(
                "sync_ref_model=True mixes weights in place, which DeepSpeed ZeRO-3 partitions across processes: use "
                "ZeRO-2, or sync_ref_model=False."
            )
        if mode == "none" and needed:
            raise ValueError(
                "ref_model_mode='none' but a KL term needs pi_ref (beta > 0 or reward_kl_coef > 0): set both to 0, or "
                "choose ref_model_mode='auto'."
            )
        if mode in ("disabled_adapter", "snapshot_adapter") and not is_peft:
            raise ValueError(
                f"ref_model_mode={mode!r} needs a PEFT model (pass peft_config=LoraConfig(...)); for full fine-tuning "
                "use 'copy' or 'auto'."
            )
        if mode == "snapshot_adapter" and partitioned:
            raise ValueError(
                "ref_model_mode='snapshot_adapter' copies adapter weights in place, which DeepSpeed ZeRO-3 partitions "
                "across processes: use ref_model_mode='disabled_adapter' (or 'auto'), or ZeRO-2."
            )
        if mode == "copy":
            frozen = load_copy() if load_copy is not None else copy.deepcopy(policy)
            return cls(mode, frozen.eval().requires_grad_(False))
        reference = cls(mode)
        if mode == "snapshot_adapter":
            reference.active_adapter = policy.active_adapter
            policy.add_adapter(SNAPSHOT_ADAPTER, policy.peft_config[reference.active_adapter])
            policy.set_adapter(reference.active_adapter)  # keeps the trained adapter trainable, the snapshot frozen
            reference.sync(policy)
        return reference

    def prepare(self, accelerator, deepspeed: bool, cast_lm_head: bool) -> None:
        """A reference copy placed like the policy: its lm_head in fp32 if the policy's is (a copy loaded again under
        ZeRO-3 too), then under DeepSpeed an inference engine partitioned like the policy, else accelerate's eval
        model. Nothing to do for the adapter modes."""
        if self.model is None:
            return
        if cast_lm_head:
            cast_lm_head_to_fp32(self.model)
        if deepspeed:
            self.model = prepare_deepspeed(self.model, accelerator)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)

    @classmethod
    def from_config(cls, args, policy: nn.Module, model_path: str, quantization_config=None) -> ReferencePolicy:
        """A trainer's reference: `ref_model_mode`, needed when `beta` or `reward_kl_coef` is non-zero, mixed with
        `sync_ref_model`; under DeepSpeed ZeRO-3 (weights already partitioned) a copy is loaded again from
        `model_path` rather than copied."""
        zero3 = is_deepspeed_zero3_enabled()  # set by args.deepspeed: from_pretrained has partitioned the weights
        load_copy = functools.partial(
            load_reference_copy, model_path, args.model_init_kwargs, quantization_config, trains_on_cpu(args)
        )
        return cls.build(
            policy,
            args.ref_model_mode,
            needed=args.beta > 0 or args.reward_kl_coef > 0,
            load_copy=load_copy if zero3 else None,
            partitioned=zero3,
            mixed=args.sync_ref_model,
        )

    def memory_note(self, policy: nn.Module) -> str:
        if self.mode == "copy":
            size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        elif self.mode == "snapshot_adapter":
            size = sum(p.numel() * p.element_size() for p in _adapter_parameters(policy, SNAPSHOT_ADAPTER).values())
        else:
            return "no extra weights"
        return f"{size / 2**20:.1f} MiB of frozen weights"

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float = 1.0) -> None:
        """pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref, weight by weight (TR-DPO; alpha = 1: a reset to the
        policy). Snapshot mode mixes the trained adapter into the frozen one, copy mode the policy into the copy;
        the other modes have no reference weights and are left as they are."""
        if self.mode not in MIXABLE_MODES:
            return
        policy = unwrap_distributed(policy)
        if self.mode == "snapshot_adapter":
            pairs = _adapter_parameters(policy, self.active_adapter)
            reference = _adapter_parameters(policy, SNAPSHOT_ADAPTER)
        else:
            pairs = dict(policy.named_parameters())
            reference = dict(unwrap_distributed(self.model).named_parameters())
        if pairs.keys() != reference.keys():
            raise RuntimeError(
                f"The reference ({self.mode}) and the policy have different parameters, so they cannot be mixed: "
                f"{sorted(pairs.keys() ^ reference.keys())[:5]}."
            )
        for name, parameter in pairs.items():
            reference[name].mul_(1.0 - alpha).add_(parameter.to(reference[name].dtype), alpha=alpha)

    @contextmanager
    def activate(self, policy: nn.Module):
        """Yield the module whose forward pass is pi_ref."""
        if self.mode == "none":
            raise RuntimeError("There is no reference policy when beta == 0 and reward_kl_coef == 0.")
        if self.mode == "copy":
            yield self.model
            return
        unwrapped = unwrap_distributed(policy)
        if self.mode == "snapshot_adapter":
            unwrapped.set_adapter(SNAPSHOT_ADAPTER)
            try:
                yield policy
            finally:
                unwrapped.set_adapter(self.active_adapter)  # PEFT makes the active adapter trainable again
            return
        with unwrapped.disable_adapter() if _is_peft_model(unwrapped) else nullcontext():
            yield policy
