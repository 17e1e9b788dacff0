"""Per-token log-probs and entropies of completion tokens, without materialising the (B, T, V) logits.

We write our own chunked path instead of TRL's `add_fused_lm_head` because that one patches `model.forward` and must
be installed before PEFT wraps the model; here the backbone runs once, and the LM head is applied to `chunk_size`
completion tokens at a time under activation checkpointing, so the forward and the backward both hold at most
`chunk_size x V` logits. Calling the LM head module itself (not its weight) keeps a LoRA adapter on `lm_head`, a
quantized head and PEFT's disabled-adapter context all working.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside DDP / accelerate / PEFT wrappers (LoRA layers stay injected in it)."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def _score_chunk(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float):
    logits = lm_head(hidden).float() / temperature  # (n, V): only this chunk's logits exist at a time
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (n,)
    logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_normalizer  # (n,)
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = log_normalizer - (probs * logits).sum(-1)  # (n,)
    return logps, entropy


def completion_logps_and_entropies(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each of the last `logits_to_keep` tokens of `input_ids`, each `(B, C)`.

    Positions where `attention_mask` is 0 get 0. Entropies carry no gradient (they are logged, not optimised).
    Position ids follow the attention mask, as in `generate`, so left-padded prompts score as they were sampled.
    """
    causal_lm = _causal_lm(model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    lm_head = causal_lm.get_output_embeddings()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden_states = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    hidden_states = hidden_states[:, -logits_to_keep - 1 : -1]  # (B, C, H): position t predicts token t + 1
    labels = input_ids[:, -logits_to_keep:]  # (B, C)
    scored = attention_mask[:, -logits_to_keep:].bool()  # (B, C)

    hidden_flat, labels_flat = hidden_states[scored], labels[scored]  # (n, H), (n,): padding is never projected
    logps_chunks, entropy_chunks = [], []
    for start in range(0, labels_flat.numel(), chunk_size):
        chunk = (lm_head, hidden_flat[start : start + chunk_size], labels_flat[start : start + chunk_size], temperature)
        if torch.is_grad_enabled():
            logps, entropy = checkpoint(_score_chunk, *chunk, use_reentrant=False)
        else:
            logps, entropy = _score_chunk(*chunk)
        logps_chunks.append(logps)
        entropy_chunks.append(entropy)

    per_token_logps = hidden_states.new_zeros(labels.shape, dtype=torch.float32)  # (B, C)
    entropies = torch.zeros_like(per_token_logps)  # (B, C)
    if logps_chunks:
        per_token_logps = per_token_logps.masked_scatter(scored, torch.cat(logps_chunks))
        entropies = entropies.masked_scatter(scored, torch.cat(entropy_chunks))
    else:  # nothing to score: keep the result connected to the graph so backward() still works
        per_token_logps = per_token_logps + 0.0 * hidden_states.sum()
    return per_token_logps, entropies
