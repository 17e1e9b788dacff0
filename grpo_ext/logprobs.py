"""Per-token log-probs and entropies of completion tokens, without materialising the (B, T, V) logits.

The causal LM's `forward` gets one extra keyword, `score_completions=C`: the backbone runs once, and the LM head is
applied to at most `chunk_size` completion tokens at a time under activation checkpointing, so the forward and the
backward both hold at most `chunk_size x V` logits. The call still enters through the outermost wrapper (DDP,
accelerate's autocast, PEFT), so gradients are synchronised and mixed precision applies as for a normal forward.

Why our own and not TRL's `add_fused_lm_head`: that one multiplies the head's *weight* directly, which skips a LoRA
adapter on `lm_head`, and must be installed before PEFT wraps the model. Here the LM head *module* is called, so a
LoRA `lm_head`, a quantized head and PEFT's disabled-adapter context all work, and the patch is added lazily to any
model (policy, frozen reference copy) the first time it is scored.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput


@dataclass
class CompletionScores(ModelOutput):
    """`logps`, `entropies`: `(B, C)` each, 0 where the completion is padding."""

    logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside DDP / accelerate / PEFT wrappers (LoRA layers stay injected in it)."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def _logit_transform(config):
    """What the model's own forward does to the LM head's output: Cohere's `logit_scale`, Granite's
    `logits_scaling`, Gemma-2/3's `final_logit_softcapping`. None when the logits are used as they are."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None) or 1.0
    if getattr(config, "logits_scaling", None):
        scale = scale / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale == 1.0 and not softcap:
        return None

    def transform(logits):
        logits = logits * scale
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return transform


_ENTROPY_GRADIENTS = "_grpo_ext_entropy_gradients"


def enable_entropy_gradients(model: nn.Module) -> None:
    """Make the entropies scored through `model`'s LM head carry gradients (an entropy bonus in the loss needs them).
    Off by default: the gradient holds one more `chunk_size x V` tensor during the LM head's backward. A flag on the
    head module, so the checkpointed recomputation sees the same setting as the forward."""
    setattr(_causal_lm(model).get_output_embeddings(), _ENTROPY_GRADIENTS, True)


def _score_chunk(lm_head, transform, hidden, labels, temperature):
    logits = lm_head(hidden).float()  # (n, V): only this chunk's logits exist at a time
    if transform is not None:
        logits = transform(logits)
    logits = logits / temperature
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (n,)
    logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_normalizer  # (n,)
    with torch.set_grad_enabled(torch.is_grad_enabled() and getattr(lm_head, _ENTROPY_GRADIENTS, False)):
        entropy = log_normalizer - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # (n,)
    return logps, entropy


def score_hidden_states(causal_lm, hidden_states, labels, scored, temperature, chunk_size):
    """Log-probs and entropies `(B, C)` of `labels` from the hidden states `(B, C, H)` that predict them, through the
    LM head `chunk_size` scored tokens at a time (shared by the plain and the prefix-shared paths)."""
    lm_head = causal_lm.get_output_embeddings()
    transform = _logit_transform(causal_lm.config)
    hidden_flat, labels_flat = hidden_states[scored], labels[scored]  # (n, H), (n,): padding is never projected
    logps_chunks, entropy_chunks = [], []
    for start in range(0, labels_flat.numel(), chunk_size):
        chunk = (lm_head, transform, hidden_flat[start : start + chunk_size], labels_flat[start : start + chunk_size])
        if torch.is_grad_enabled():
            logps, entropy = checkpoint(_score_chunk, *chunk, temperature, use_reentrant=False)
        else:
            logps, entropy = _score_chunk(*chunk, temperature)
        logps_chunks.append(logps)
        entropy_chunks.append(entropy)

    logps = hidden_states.new_zeros(labels.shape, dtype=torch.float32)  # (B, C)
    entropies = torch.zeros_like(logps)  # (B, C)
    if logps_chunks:
        logps = logps.masked_scatter(scored, torch.cat(logps_chunks))
        entropies = entropies.masked_scatter(scored, torch.cat(entropy_chunks))
    else:  # nothing to score: keep the result connected to the graph so backward() still works
        logps = logps + 0.0 * hidden_states.sum()
    return logps, entropies


def _scoring_forward(causal_lm, input_ids, attention_mask, position_ids, logits_to_keep, temperature, chunk_size):
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden_states = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    hidden_states = hidden_states[:, -logits_to_keep - 1 : -1]  # (B, C, H): position t predicts token t + 1
    labels = input_ids[:, -logits_to_keep:]  # (B, C)
    scored = attention_mask[:, -logits_to_keep:].bool()  # (B, C)
    logps, entropies = score_hidden_states(causal_lm, hidden_states, labels, scored, temperature, chunk_size)
    return CompletionScores(logps=logps, entropies=entropies)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids `(B, T)` that follow the attention mask, as `generate` numbers a left-padded row: the first real
    token is 0 (padding gets 0 too; it is masked out)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def add_completion_scoring(model: nn.Module) -> None:
    """Teach the causal LM inside `model` the `score_completions` keyword (idempotent; generation is unchanged)."""
    causal_lm = _causal_lm(model)
    if getattr(causal_lm, "_grpo_ext_scoring", False):
        return
    original_forward = causal_lm.forward

    @functools.wraps(type(causal_lm).forward)  # keep the signature: `generate` validates kwargs against it
    def forward(self, *args, score_completions=None, temperature=1.0, chunk_size=1024, **kwargs):
        if score_completions is None:
            return original_forward(*args, **kwargs)
        return _scoring_forward(
            self,
            kwargs["input_ids"],
            kwargs["attention_mask"],
            kwargs["position_ids"],
            score_completions,
            temperature,
            chunk_size,
        )

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._grpo_ext_scoring = True


def completion_logps_and_entropies(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each of the last `logits_to_keep` tokens of `input_ids`, each `(B, C)`.

    `model` may be wrapped (DDP, PEFT, accelerate); the call goes through its forward. Positions where
    `attention_mask` is 0 get 0. Entropies carry no gradient unless `enable_entropy_gradients(model)` was called. Position ids follow
    the attention mask, as in `generate`, so left-padded prompts score as they were sampled.
    """
    add_completion_scoring(model)
    position_ids = position_ids_from_mask(attention_mask)  # (B, T)
    scores = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        score_completions=logits_to_keep,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return scores["logps"], scores["entropies"]


@torch.no_grad()
def check_against_full_logits(model: nn.Module, tokens: int = 8, atol: float = 0.05) -> None:
    """Score a few tokens both ways and fail loudly if the chunked path disagrees with the model's own logits
    (an architecture that post-processes its logits in a way `_logit_transform` does not know). The tolerance
    allows bf16 rounding; an unknown logit transform is off by far more."""
    causal_lm = _causal_lm(model)
    device = next(causal_lm.parameters()).device
    vocab = causal_lm.get_output_embeddings().out_features
    input_ids = torch.arange(tokens, device=device).remainder(vocab).unsqueeze(0)  # (1, T)
    attention_mask = torch.ones_like(input_ids)
    was_training = causal_lm.training
    causal_lm.eval()  # dropout (e.g. LoRA's) would make the two passes differ
    try:
        logps, _ = completion_logps_and_entropies(causal_lm, input_ids, attention_mask, tokens - 1)
        logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (1, T-1, V)
    finally:
        causal_lm.train(was_training)
    expected = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    error = (logps - expected).abs().max().item()
    if not error <= atol:
        raise NotImplementedError(
            f"{type(causal_lm).__name__}: the chunked log-probs differ from the model's own logits by {error:.3g}; "
            "this architecture transforms its logits in a way grpo_ext.logprobs does not reproduce. Please open an "
            "issue with the model id."
        )
