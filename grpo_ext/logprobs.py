"""Per-token log-probs and entropies of completion tokens, without materialising the (B, T, V) logits.

This module holds the one patch grpo-ext makes to a model: its causal LM's `forward` learns one extra keyword,
`score_completions=ScoringRequest(...)`. Why a patch rather than calling the backbone directly:
- the call must enter through the outermost wrapper (DDP, FSDP, accelerate's autocast, PEFT), so gradients are
  synchronised, mixed precision applies and a disabled-adapter context holds, exactly as for a normal forward;
- the LM head is applied to at most `chunk_size` completion tokens at a time under activation checkpointing, so the
  forward and the backward hold at most `chunk_size x V` logits, never `(B, T, V)`.
The request says how to run the backbone: `ScoringRequest` (plain: prompt and completion as one sequence) or its
subclass `prefix_sharing.SharedPrefixScoring` (each prompt encoded once per group). The forward is patched once per
model, lazily, the first time it is scored (policy or frozen reference copy); generation is unchanged.

Why our own and not TRL's `add_fused_lm_head`: that one multiplies the head's *weight* directly, which skips a LoRA
adapter on `lm_head`, and must be installed before PEFT wraps the model. Here the LM head *module* is called, so a
LoRA `lm_head`, a quantized head and PEFT's disabled-adapter context all work.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .models import unwrap_causal_lm
from .moe import load_balancing_loss


@dataclass
class CompletionScores(ModelOutput):
    """`logps`, `entropies`: `(B, C)` each, 0 where the completion is padding; `aux_loss`: the MoE load-balancing
    loss of the pass (a scalar), when the request asked for it."""

    logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _logit_transform(config):
    """What the model's own forward does to the LM head's output: Cohere's `logit_scale`, Falcon-H1's
    `lm_head_multiplier`, Granite's `logits_scaling`, Gemma-2/3's `final_logit_softcapping`. None when the logits are
    used as they are."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = (getattr(config, "logit_scale", None) or 1.0) * (getattr(config, "lm_head_multiplier", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale = scale / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale == 1.0 and not softcap:
        return None

    def transform(logits):
        logits = logits * scale
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return transform


def _score_chunk(lm_head, transform, hidden, labels, temperature, entropy_gradients):
    logits = lm_head(hidden).float()  # (n, V): only this chunk's logits exist at a time
    if transform is not None:
        logits = transform(logits)
    logits = logits / temperature
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (n,)
    logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_normalizer  # (n,)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_gradients):
        entropy = log_normalizer - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # (n,)
    return logps, entropy


def score_hidden_states(causal_lm, hidden_states, labels, scored, temperature, chunk_size, entropy_gradients=False):
    """Log-probs and entropies `(B, C)` of `labels` from the hidden states `(B, C, H)` that predict them, through the
    LM head `chunk_size` scored tokens at a time (shared by the plain and the prefix-shared paths). Entropies carry a
    gradient only with `entropy_gradients` (an entropy bonus in the loss): it holds one more `chunk_size x V` tensor
    during the LM head's backward."""
    lm_head = causal_lm.get_output_embeddings()
    transform = _logit_transform(causal_lm.config)
    hidden_flat, labels_flat = hidden_states[scored], labels[scored]  # (n, H), (n,): padding is never projected
    logps_chunks, entropy_chunks = [], []
    for start in range(0, labels_flat.numel(), chunk_size):
        chunk = (lm_head, transform, hidden_flat[start : start + chunk_size], labels_flat[start : start + chunk_size])
        if torch.is_grad_enabled():
            logps, entropy = checkpoint(_score_chunk, *chunk, temperature, entropy_gradients, use_reentrant=False)
        else:
            logps, entropy = _score_chunk(*chunk, temperature, False)
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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids `(B, T)` that follow the attention mask, as `generate` numbers a left-padded row: the first real
    token is 0 (padding gets 0 too; it is masked out)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def positions(backbone: nn.Module, attention_mask: torch.Tensor) -> dict:
    """The position ids a scoring pass gives the backbone: those of `position_ids_from_mask`, except to a model that
    numbers the tokens itself from the mask and the images (Qwen2-VL's multimodal rotary positions, `get_rope_index`),
    which is given none, as `generate` gives it none."""
    if hasattr(backbone, "get_rope_index"):
        return {}
    return {"position_ids": position_ids_from_mask(attention_mask)}


@dataclass
class ScoringRequest:
    """Score these completions after the prompts given as the forward's `input_ids` / `attention_mask` `(N, P)`.

    Passed through the model's wrappers as one keyword, so no wrapper consumes its fields. This class runs the plain
    path: prompt and completion as one sequence through the backbone. `prefix_sharing.SharedPrefixScoring` overrides
    `run` to encode each prompt once per group.
    """

    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C)
    temperature: float = 1.0
    chunk_size: int = 1024
    entropy_gradients: bool = False  # entropies with a gradient, for an entropy bonus in the loss
    router_aux_loss: bool = False  # also the MoE load-balancing loss of this pass (moe.py)
    # Extra inputs of the forward over prompt + completion: a vision-language model's image tensors (vision.py)
    model_inputs: dict | None = None

    def backbone_kwargs(self) -> dict:
        """Extra keywords of the backbone calls: the router logits, when the load-balancing loss is asked for."""
        return {"output_router_logits": True} if self.router_aux_loss else {}

    def run(self, causal_lm: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> CompletionScores:
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        input_ids = torch.cat([prompt_ids, self.completion_ids], dim=1)  # (N, P+C)
        attention_mask = torch.cat([prompt_mask, self.completion_mask], dim=1)  # (N, P+C)
        outputs = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **positions(backbone, attention_mask),
            use_cache=False,
            **self.backbone_kwargs(),
            **(self.model_inputs or {}),
        )
        hidden_states = outputs.last_hidden_state  # (N, P+C, H)
        completion_length = self.completion_ids.size(1)
        hidden_states = hidden_states[:, -completion_length - 1 : -1]  # (N, C, H): position t predicts token t + 1
        logps, entropies = score_hidden_states(
            causal_lm,
            hidden_states,
            self.completion_ids,
            self.completion_mask.bool(),
            self.temperature,
            self.chunk_size,
            self.entropy_gradients,
        )
        aux_loss = None
        if self.router_aux_loss:
            aux_loss = load_balancing_loss(causal_lm, outputs.router_logits, attention_mask)
        return CompletionScores(logps=logps, entropies=entropies, aux_loss=aux_loss)


def _add_scoring(model: nn.Module) -> None:
    """Teach the causal LM inside `model` the `score_completions` keyword (idempotent)."""
    causal_lm = unwrap_causal_lm(model)
    if getattr(causal_lm, "_grpo_ext_scoring", False):
        return
    original_forward = causal_lm.forward

    @functools.wraps(type(causal_lm).forward)  # keep the signature: `generate` validates kwargs against it
    def forward(self, *args, score_completions: ScoringRequest | None = None, **kwargs):
        if score_completions is None:
            return original_forward(*args, **kwargs)
        return score_completions.run(self, kwargs["input_ids"], kwargs["attention_mask"])

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._grpo_ext_scoring = True


def score_completions(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, request: ScoringRequest
) -> CompletionScores:
    """Log-probs and entropies `(N, C)` of `request`'s completions after the left-padded prompts `(N, P)` (and the
    load-balancing loss when asked), through `model`'s own forward (which may be wrapped: DDP, PEFT, accelerate, or a
    PEFT model in `disable_adapter()`)."""
    _add_scoring(model)
    scores = model(input_ids=prompt_ids, attention_mask=prompt_mask, score_completions=request)
    return CompletionScores(logps=scores["logps"], entropies=scores["entropies"], aux_loss=scores.get("aux_loss"))


def completion_logps_and_entropies(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each of the last `logits_to_keep` tokens of `input_ids`, each `(B, C)`.

    Positions where `attention_mask` is 0 get 0. Entropies carry no gradient. Position ids follow the attention mask, as in `generate`, so left-padded prompts score as they were
    sampled.
    """
    prompt_ids, completion_ids = input_ids[:, :-logits_to_keep], input_ids[:, -logits_to_keep:]
    prompt_mask, completion_mask = attention_mask[:, :-logits_to_keep], attention_mask[:, -logits_to_keep:]
    request = ScoringRequest(completion_ids, completion_mask, temperature, chunk_size)
    scores = score_completions(model, prompt_ids, prompt_mask, request)
    return scores.logps, scores.entropies


@torch.no_grad()
def check_against_full_logits(model: nn.Module, tokens: int = 8, atol: float = 0.05) -> None:
    """Score a few tokens both ways and fail loudly if the chunked path disagrees with the model's own logits
    (an architecture that post-processes its logits in a way `_logit_transform` does not know). The tolerance
    allows bf16 rounding; an unknown logit transform is off by far more."""
    causal_lm = unwrap_causal_lm(model)
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
