"""The load-balancing loss of Mixture-of-Experts models (TRL's `router_aux_loss_coef`).

A MoE layer sends each token to `num_experts_per_tok` of its `num_experts` experts; the load-balancing loss (Switch
Transformer, arXiv 2101.03961, eqs. 4-6) grows when the router sends most tokens to a few experts. transformers' MoE
causal LMs compute it in their forward, from the router logits the backbone returns with `output_router_logits=True`.
grpo-ext's scoring pass calls the backbone itself (logprobs.py), so it asks the backbone for the router logits and
computes the loss with the model's own `load_balancing_loss_func` (from its modelling module), over the tokens of the
attention mask: the value the model's own forward returns as `aux_loss` for the same prompt + completion batch (also
through prefix sharing's two passes, prefix_sharing.py).

Which models have one, and the coefficient (`router_aux_coef`), follow TRL: a model whose config has an
`output_router_logits` attribute is a MoE model; the coefficient is `router_aux_loss_coef` when set, else the model
config's own. Generation asks for no router logits (`without_router_logits`).
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from .models import unwrap_causal_lm


def is_moe(model: nn.Module) -> bool:
    """Whether the model routes tokens through experts and can return its router logits (TRL's test)."""
    return hasattr(unwrap_causal_lm(model).config.get_text_config(), "output_router_logits")


def _loss_function(causal_lm: nn.Module):
    return getattr(sys.modules[type(causal_lm).__module__], "load_balancing_loss_func", None)


def router_aux_coef(model: nn.Module, router_aux_loss_coef: float | None) -> float:
    """The weight of the load-balancing loss in the GRPO loss: `router_aux_loss_coef`, or the model config's own when
    None (0.0 for a dense model). Raises `ValueError` for a non-zero coefficient on a model without one, or on a MoE
    model whose loss grpo-ext cannot compute."""
    causal_lm = unwrap_causal_lm(model)
    name = type(causal_lm).__name__
    if router_aux_loss_coef and not is_moe(model):
        raise ValueError(
            f"router_aux_loss_coef={router_aux_loss_coef} is set but {name} is not a Mixture-of-Experts model that "
            "returns its router logits, so there is no load-balancing loss to weight. Leave router_aux_loss_coef=None."
        )
    config_coef = getattr(causal_lm.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0
    coef = config_coef if router_aux_loss_coef is None else router_aux_loss_coef
    has_parts = all(hasattr(causal_lm, attribute) for attribute in ("num_experts", "num_experts_per_tok"))
    if coef and (_loss_function(causal_lm) is None or not has_parts):
        raise ValueError(
            f"{name}: grpo-ext cannot compute this model's load-balancing loss (its modelling module has no "
            "`load_balancing_loss_func`, or the model no `num_experts` / `num_experts_per_tok`). Set "
            "router_aux_loss_coef=0.0 to train without it."
        )
    return float(coef)


def without_router_logits(model: nn.Module) -> dict:
    """Keywords for `generate` and decoding forwards: no router logits. Decoding needs none, and transformers' MoE
    forward fails computing its load-balancing loss against a KV cache when the config sets `output_router_logits`."""
    forward = unwrap_causal_lm(model).forward
    return {"output_router_logits": False} if "output_router_logits" in inspect.signature(forward).parameters else {}


def load_balancing_loss(
    causal_lm: nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
) -> torch.Tensor:
    """The model's own load-balancing loss (a scalar) from the router logits of each layer `(N*T, E)`, the tokens in
    the row order of `attention_mask` `(N, T)`, padding left out."""
    loss_function = _loss_function(causal_lm)
    return loss_function(router_logits, causal_lm.num_experts, causal_lm.num_experts_per_tok, attention_mask)
