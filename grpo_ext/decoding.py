"""Sampling that drops finished rows: a completion leaves the decoding batch, and its rows leave the cache (keys/values
or recurrent states, `cache_rows`), as soon as it emits a stop token.

`model.generate` decodes every row of the batch until the longest one stops: with uneven completion lengths (real RL:
a few tokens to `max_completion_length` within one group) most decode steps then run on rows whose output is thrown
away. This loop runs the same model calls on the rows still going only.

Same distribution as `generate`: the logits processors and warpers (temperature, top-k / top-p / min-p, repetition
penalty, min-new-tokens, ...) are the ones `generate` builds from the same `GenerationConfig` (its own
`_get_logits_processor`, merged with the model's generation defaults), applied to the same float32 logits; the token is
drawn with `torch.multinomial` from their softmax (the argmax without sampling); a row stops at its first stop token
and is padded after it. Greedy completions are token-identical to `generate`'s; sampled ones follow the same
distribution (not the same draws: the random stream is consumed by fewer rows). Everything these processors see is
per row, so removing a row changes nothing for the others.

Settings that need `generate`'s own loop (beam search, several sequences per prompt, stop strings, static or other
non-dynamic caches, no cache, assisted decoding, cache layers whose rows `cache_rows` cannot take, or a transformers
version whose private helpers moved) are reported by `unsupported_reason`; the caller then uses `generate`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicCache

from . import cache_rows
from .logprobs import position_ids_from_mask
from .models import unwrap_causal_lm, uses_prompt_learning
from .moe import without_router_logits

# Reasons already warned about: each fallback is announced once per process, not once per step.
_WARNED: set[str] = set()


def warn_generate(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"Finished rows are not dropped from decoding, using model.generate: {reason}", stacklevel=3)


# GenerationConfig fields whose non-default value this loop does not reproduce, with the default that it does.
_NEEDS_GENERATE = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "stop_strings": None,
    "max_time": None,
    "assistant_model": None,
    "prompt_lookup_num_tokens": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}


def _merged_config(model: nn.Module, generation_config: GenerationConfig) -> GenerationConfig:
    """The config `generate` would run with: the fields left unset taken from the model's generation defaults."""
    merged, _ = unwrap_causal_lm(model)._prepare_generation_config(generation_config)
    return merged


def unsupported_reason(
    model: nn.Module, generation_config: GenerationConfig, images_prefilled: bool = False
) -> str | None:
    """Why `generate_dropping_finished` cannot reproduce `model.generate` with this config, or None when it can.
    `images_prefilled`: a vision-language model's prompts come prefilled with their images, with each row's position
    offset (`prefix_sharing.shared_image_prompt_cache`), so the loop decodes text only."""
    causal_lm = unwrap_causal_lm(model)
    for helper in ("_prepare_generation_config", "_prepare_special_tokens", "_get_logits_processor"):
        if not hasattr(causal_lm, helper):
            return f"this transformers version has no GenerationMixin.{helper}"
    config = _merged_config(model, generation_config)
    for name, default in _NEEDS_GENERATE.items():
        value = getattr(config, name, default)
        if value is not None and value != default and not (name == "guidance_scale" and value == 1):
            return f"generation_config.{name}={value!r} needs generate's own loop"
    if config.use_cache is False:
        return "generation_config.use_cache is False"
    if config.cache_implementation not in (None, "dynamic"):
        return f"cache_implementation={config.cache_implementation!r}: only a DynamicCache drops rows"
    if not config.max_new_tokens:
        return "generation_config.max_new_tokens is not set"
    if getattr(causal_lm.config, "is_encoder_decoder", False):
        return f"{type(causal_lm).__name__} is an encoder-decoder model"
    if uses_prompt_learning(model):
        return "prompt-learning adapters (prefix / prompt tuning) manage the KV cache themselves"
    if getattr(causal_lm.config, "vision_config", None) is not None and not images_prefilled:  # images: generate's
        return f"{type(causal_lm).__name__} is a vision-language model"
    return cache_rows.unsupported_reason(model)


@dataclass
class DecodingSetup:
    """What a decoding loop takes from `generate`'s own preparation of a `GenerationConfig`."""

    config: GenerationConfig  # merged with the model's generation defaults
    processors: LogitsProcessorList  # the processors and warpers generate would apply
    stop_ids: torch.Tensor  # (S,) the stop tokens
    pad_id: int
    keeps_logits: bool  # the forward takes `logits_to_keep` (no (B, P, V) prefill logits)
    forward_kwargs: dict  # constant keywords of every decoding forward (no router logits)


def prepare_decoding(model: nn.Module, input_ids: torch.Tensor, generation_config: GenerationConfig) -> DecodingSetup:
    """generate's preparation for the left-padded prompts `input_ids` `(B, P)`, for a loop of our own."""
    config = _merged_config(model, generation_config)
    causal_lm = unwrap_causal_lm(model)
    # generate's own stop and pad tokens (pad falls back to EOS), which min-length rules read too
    causal_lm._prepare_special_tokens(config, True, device=input_ids.device)
    processors = causal_lm._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=input_ids.size(1),
        encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(),
        device=input_ids.device,
        model_kwargs={},
    )
    stop_ids = config._eos_token_tensor  # (S,)
    stop_ids = input_ids.new_zeros(0) if stop_ids is None else stop_ids.reshape(-1)
    keeps_logits = "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
    return DecodingSetup(
        config, processors, stop_ids, int(config._pad_token_tensor), keeps_logits, without_router_logits(causal_lm)
    )


@torch.no_grad()
def generate_dropping_finished(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation_config: GenerationConfig,
    cache: Cache | None = None,
    position_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Completion ids `(B, C)` of the left-padded prompts `(B, P)`, padded after each row's stop token, `C` the longest
    completion (at most `max_new_tokens`), as `generate(...)[:, P:]` returns them.

    `cache`: a KV cache that already holds all but the last token of every prompt (prefix sharing prefills it once per
    group); without one the prompts are prefilled here. `position_offsets` `(B, 1)`: added to each row's position ids
    after the cache (a prompt with images: Qwen2-VL's `rope_deltas`, from `prefix_sharing.shared_image_prompt_cache`).
    """
    setup = prepare_decoding(model, input_ids, generation_config)
    config, processors, stop_ids, pad_id = setup.config, setup.processors, setup.stop_ids, setup.pad_id
    keep_one = ({"logits_to_keep": 1} if setup.keeps_logits else {}) | setup.forward_kwargs
    causal_lm = unwrap_causal_lm(model)

    completions = input_ids.new_full((input_ids.size(0), config.max_new_tokens), pad_id)  # (B, max_new_tokens)
    rows = torch.arange(input_ids.size(0), device=input_ids.device)  # (b,) batch index of each row still going
    sequences, mask = input_ids, attention_mask  # (b, P + t): what the processors see, and the attention mask
    prefill = cache is None
    if prefill:
        cache = DynamicCache(config=causal_lm.config)
        step_ids, step_positions = input_ids, position_ids_from_mask(attention_mask)  # prefill: (B, P) each
    else:  # the cache holds all but the last prompt token
        step_ids, step_positions = input_ids[:, -1:], attention_mask.sum(-1, keepdim=True) - 1  # (B, 1) each
    offsets = position_offsets if position_offsets is not None else torch.zeros_like(rows[:, None])  # (b, 1)
    step_positions = step_positions + offsets
    # Without attention layers (Mamba) the mask only zeroes the prompt's padding, which the prefill has done; as in
    # generate, decoding steps get none (Mamba's mixers would broadcast a (b, P + t) mask over their one token).
    attends = not cache.layers or not all(cache.is_linear)
    for t in range(config.max_new_tokens):
        logits = (
            model(
                input_ids=step_ids,
                attention_mask=mask if attends or (prefill and t == 0) else None,
                position_ids=step_positions,
                cache=cache,
                use_cache=True,
                **keep_one,
            )
            .logits[:, -1]
            .float()
        )  # (b, V)
        scores = processors(sequences, logits)  # (b, V)
        if config.do_sample:
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # (b,)
        else:
            next_ids = scores.argmax(-1)  # (b,)
        completions[rows, t] = next_ids
        finished = torch.isin(next_ids, stop_ids)  # (b,)
        if bool(finished.all()):
            return completions[:, : t + 1]
        if bool(finished.any()):  # drop the finished rows from the batch and from every cache layer
            going = (~finished).nonzero().squeeze(1)  # (b',)
            rows, next_ids, sequences, mask = rows[going], next_ids[going], sequences[going], mask[going]
            offsets = offsets[going]
            cache_rows.take_rows(cache, going)  # keys/values or recurrent states, by layer type
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)  # (b, P + t + 1)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)  # (b, P + t + 1)
        step_ids, step_positions = next_ids[:, None], mask.sum(-1, keepdim=True) - 1 + offsets  # (b, 1) each
    return completions
