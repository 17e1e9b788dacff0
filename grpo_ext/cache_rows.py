"""Rows of a generation cache: taking some rows of a batch's cache (a finished completion dropped from decoding) or
repeating them (a prompt's state handed to its G completions), per cache layer type.

One operation does both: `take_rows(cache, index)` keeps row `index[i]` as row i, so dropping rows is an index of the
rows still going and sharing a prompt is `arange(B).repeat_interleave(G)`. What a row is differs by layer type:

- an attention layer (full, sliding window, DSA indexer) holds keys/values `(B, H, T, D)`, one entry per token seen
  (the last window's tokens for a sliding layer): its rows are taken by transformers' own `batch_select_indices`,
  which knows the layer's extra tensors (an indexer's keys);
- a recurrent layer (linear attention such as Gated DeltaNet, a Mamba / SSM mixer, a short convolution) holds no
  entry per token but one running state per row, whatever the number of tokens it has read: its convolution window
  `(B, C, K)` and its recurrent state `(B, H, ...)`, each of its `number_of_states`. These layers have no
  `batch_select_indices` (transformers only reorders them for beam search), so the rows of every state are taken
  here. Their flags (`has_previous_state`, the kernel sizes) are per layer, not per row, and stay as they are;
- a hybrid layer (Falcon-H1: attention and a Mamba mixer side by side) holds both, taken both ways;
- a dummy layer (a layer that reads another's keys/values) holds nothing.

Layers whose rows cannot be taken this way (a static cache's preallocated rows, quantized keys/values with their
residual buffers, a layer type this table does not know) are named by `unsupported_reason`, which looks at the layer
classes of the cache the model's config builds: the rollout asks it once per plan and then uses `generate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import (
    BaseQuantizedLayer,
    Cache,
    DummyLayer,
    DynamicCache,
    DynamicLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionAndStaticFullAttentionLayer,
    LinearAttentionAndStaticSlidingWindowAttentionLayer,
    LinearAttentionLayer,
    StaticLayer,
)

from .models import unwrap_causal_lm

__all__ = [
    "take_rows",
    "unsupported_reason",
    "rule_for",
    "ROW_TAKERS",
    "CANNOT_TAKE",
]


def _take_attention_rows(layer, index: torch.Tensor) -> None:
    layer.batch_select_indices(index)  # keys/values (and any extra per-token tensor) along the batch


def _take_state_rows(layer, index: torch.Tensor) -> None:
    for states in (layer.conv_states, layer.recurrent_states):
        for state_idx, state in states.items():
            if state is not None:  # a layer may use only one kind of state (a short convolution has no recurrence)
                states[state_idx] = state[index]


def _take_hybrid_rows(layer, index: torch.Tensor) -> None:
    _take_state_rows(layer, index)
    _take_attention_rows(layer, index)


def _take_nothing(layer, index: torch.Tensor) -> None:
    pass


# Cache layer class -> how its rows are taken. Looked up along the layer's class hierarchy, nearest class first, so a
# hybrid layer finds its own entry before those of the two layers it combines.
ROW_TAKERS: dict[type, Callable[[object, torch.Tensor], None]] = {
    DynamicLayer: _take_attention_rows,  # full attention, and the sliding-window and DSA-indexer layers built on it
    LinearAttentionLayer: _take_state_rows,  # linear attention, Mamba / SSM, short convolutions
    LinearAttentionAndFullAttentionLayer: _take_hybrid_rows,
    LinearAttentionAndSlidingWindowAttentionLayer: _take_hybrid_rows,
    DummyLayer: _take_nothing,
}

# Cache layer class -> why its rows cannot be taken (looked up the same way, before ROW_TAKERS' entries).
CANNOT_TAKE: dict[type, str] = {
    StaticLayer: "a static cache preallocates its rows",
    LinearAttentionAndStaticFullAttentionLayer: "a static cache preallocates its rows",
    LinearAttentionAndStaticSlidingWindowAttentionLayer: "a static cache preallocates its rows",
    BaseQuantizedLayer: "quantized keys/values keep full-precision residual buffers beside them",
}


def rule_for(layer_class: type) -> Callable | str:
    """The row taker of a cache layer class, or the reason it has none."""
    for cls in layer_class.__mro__:
        if cls in CANNOT_TAKE:
            return CANNOT_TAKE[cls]
        if cls in ROW_TAKERS:
            return ROW_TAKERS[cls]
    return f"no rule for taking the rows of a {layer_class.__name__}"


def take_rows(cache: Cache, index: torch.Tensor) -> None:
    """Keep row `index[i]` of every layer of `cache` as its row i `(len(index),)`: drops rows, or repeats them.
    For a cache whose layers `unsupported_reason` accepts (not checked again here)."""
    for layer in cache.layers:
        rule_for(type(layer))(layer, index)


def _model_cache(model: nn.Module) -> Cache:
    """The cache `generate` builds for the model (empty: its layers are created, no tensor is)."""
    return DynamicCache(config=unwrap_causal_lm(model).config)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why rows of this model's generation cache cannot be dropped or repeated, or None when they can. Read from the
    layer classes of the cache its config builds (as `generate` does), so no forward is needed."""
    causal_lm = unwrap_causal_lm(model)
    supports_dynamic = getattr(causal_lm, "_supports_default_dynamic_cache", lambda: True)
    if not supports_dynamic():
        return f"{type(causal_lm).__name__} builds a cache of its own, not a DynamicCache"
    for layer_class in dict.fromkeys(type(layer) for layer in _model_cache(model).layers):
        rule = rule_for(layer_class)
        if isinstance(rule, str):
            return f"{type(causal_lm).__name__}'s {layer_class.__name__} cache layers: {rule}"
    return None
