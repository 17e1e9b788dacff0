"""Prefix sharing: each group's prompt is encoded once and its key/value states are shared by its G completions.

In a GRPO step the batch holds every prompt G times in a row. Plain rollouts prefill each prompt G times, and every
scoring pass (old, reference, policy) re-encodes it G times. Here the prompt goes through the model once per group:

- **Generation** (`shared_prompt_cache`): the unique prompts are prefilled once (all but their last token),
  each cache row is repeated G times along the batch (`cache_rows.take_rows`: keys/values, a sliding window's last
  keys/values, or a recurrent layer's running state, each a whole row of state), and `model.generate` continues
  from it on the repeated prompts. `generate` only feeds the tokens the cache has not seen, so it starts by decoding
  the last prompt token; everything after is ordinary decoding (sampling, stopping criteria, logits processors).
- **Scoring** (`SharedPrefixScoring`, a `logprobs.ScoringRequest`): two passes through the backbone inside one forward
  call. The prompt pass
  encodes the unique prompts and records each layer's keys/values; the completion pass runs the `(N, C)` completion
  tokens against a read-only cache that hands every completion its group's prompt keys/values in front of its own
  (attention over `P + C` keys, exactly what the plain pass computes for completion tokens). The first completion
  token is predicted from the prompt pass's last hidden state. Gradients flow into the prompt pass through the shared
  keys/values, so log-probs and their gradients equal the plain path's up to float rounding. A MoE model's
  load-balancing loss (`router_aux_loss`) is computed over the tokens of the plain pass: each prompt's router logits
  repeated for every completion of its group, then the completion's own.

**Prompts with images** (Qwen2-VL, Qwen2.5-VL: `IMAGE_SHARING_MODEL_TYPES`) share too, images included: the vision
encoder runs once per group. Their positions are not the mask's: the model numbers image tokens on three rotary axes
(time, height, width) and the text after an image from where the image's grid ends (`get_rope_index`), so a text token
after the prompt's last image sits at its index among the real tokens plus a per-prompt offset, `rope_deltas`. The
prefill (`shared_image_prompt_cache`) and the prompt pass of scoring take the prompt's positions from `get_rope_index`
and the image tensors of one row per group; the decoding steps (`decoding.generate_dropping_finished`'s
`position_offsets`) and the completion pass take the mask's positions plus each row's offset. Asked by
`image_unsupported_reason` / `image_prefill_unsupported_reason` (the rollout module decides with them once per
rollout); other vision-language models keep the plain path, every row with its own copy of the images.

Why a cache and not one packed row `[prompt, c1, ..., cG]` with a 4D block mask (Prefix Grouper, arXiv 2506.05433):
transformers 5 takes a 4D mask as is (`masking_utils._preprocess_mask_arguments`), but sdpa and eager then compute
every score of the `(P + G*C)^2` matrix. For 8 completions of 256 tokens after a 64-token prompt that is 4.5M scores
per group and head, against 8 x 256 x 320 = 0.66M for the completion rows of the plain pass; eager also materialises
the whole matrix for the backward. The cache route costs what the plain pass costs for completion tokens and needs no
custom mask: the completion pass is an ordinary forward with a cache, as in decoding. Tested with the `sdpa` and
`eager` attention implementations (Qwen2, Llama); others that read a `Cache` are checked once per model against the
plain path (`_self_check`) and fall back if they disagree.

Whether a rollout can share is asked once, for scoring by `unsupported_reason` (sliding-window or recurrent layers,
reentrant gradient checkpointing, a failed self-check) and for generation by `prefill_unsupported_reason` (cache layers
whose rows cannot be repeated, beam search, a static cache), both refusing a model whose forward takes no cache of ours
(encoder-decoder, prompt-learning adapters); the rollout module then uses the answers for generation and every scoring
pass. A recurrent layer (linear attention, Mamba) could share in scoring too, by handing each completion its group's
final prompt state; the two-pass forward does not do that yet, so such models score on the plain path. The standalone
entry points `generate_with_shared_prefix` and `shared_prefix_logps` ask it themselves and fall back to the plain path,
with one warning per reason. With dropout active, sharing draws one dropout mask per prompt instead of one per copy: the
expectation is unchanged, but set `disable_dropout=True` for runs that must match the plain path exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch
import torch.nn as nn
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import cache_rows
from .logprobs import (
    CompletionScores,
    ScoringRequest,
    completion_logps_and_entropies,
    position_ids_from_mask,
    score_completions,
    score_hidden_states,
)
from .models import unwrap_causal_lm, uses_prompt_learning
from .moe import load_balancing_loss, without_router_logits
from .vision import TOKEN_ALIGNED, VisionInputs

__all__ = [
    "unsupported_reason",
    "prefill_unsupported_reason",
    "image_unsupported_reason",
    "image_prefill_unsupported_reason",
    "shared_prompt_cache",
    "shared_image_prompt_cache",
    "groups_share_images",
    "generate_with_shared_prefix",
    "SharedPrefixScoring",
    "shared_prefix_logps",
    "unique_prompts",
    "prompt_groups",
    "warn_plain_path",
    "warn_plain_prefill",
]

# Reasons already warned about: each fallback is announced once per process, not once per step.
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)  # the caller of warn_plain_path / warn_plain_prefill


def warn_plain_path(reason: str) -> None:
    _warn_once(f"Prefix sharing is off, using the plain path: {reason}")


def warn_plain_prefill(reason: str) -> None:
    _warn_once(f"Generation prefills every row: {reason}")


# --- Groups of identical prompts ---


def prompt_groups(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vision: VisionInputs | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of identical consecutive prompt rows: the first row of each run `(U,)` and its length `(U,)`. With
    `vision`, rows of a run also hold the same images (two images of one size give the same prompt ids).

    Runs rather than fixed groups of G, so a micro-batch that cuts a group in two still shares within each part.
    """
    same_as_previous = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)
    if vision is not None:
        same_images = [_same_images(a, b) for a, b in zip(vision.rows[1:], vision.rows[:-1], strict=True)]
        same_as_previous &= torch.tensor(same_images, dtype=torch.bool, device=prompt_ids.device)
    is_start = torch.cat([same_as_previous.new_ones(1), ~same_as_previous])  # (N,)
    starts = is_start.nonzero().squeeze(-1)  # (U,)
    ends = torch.cat([starts[1:], starts.new_tensor([prompt_ids.size(0)])])  # (U,)
    return starts, ends - starts


def unique_prompts(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The `(B, P)` unique prompts of a `(B*G, P)` batch, or None when its rows are not whole groups of G.

    Training batches always hold whole groups (`RepeatSampler`); an evaluation batch may cut a group across processes.
    """
    if prompt_ids.size(0) % num_generations:
        return None
    groups_ids = prompt_ids.view(-1, num_generations, prompt_ids.size(1))  # (B, G, P)
    groups_mask = prompt_mask.view(-1, num_generations, prompt_mask.size(1))  # (B, G, P)
    if not ((groups_ids == groups_ids[:, :1]).all() and (groups_mask == groups_mask[:, :1]).all()):
        return None
    return groups_ids[:, 0], groups_mask[:, 0]


def _same_images(a: dict, b: dict) -> bool:
    """Whether two rows' image tensors (`VisionInputs` rows) are equal: the rows of a group share one dict."""
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a))


def groups_share_images(vision: VisionInputs, num_generations: int) -> bool:
    """Whether each group of G consecutive rows holds the same images (with `unique_prompts`: whole groups)."""
    rows = vision.rows
    return all(_same_images(rows[i], rows[i - i % num_generations]) for i in range(len(rows)))


# --- What can share ---


_RECURRENT = (
    "a recurrent layer reads the prompt as a running state, not as keys/values a completion can attend to; sharing "
    "would hand each completion its group's final prompt state, which this two-pass forward does not do yet"
)
_WINDOW = "a sliding or chunked window hides the start of the prompt from the completion tokens"

# Layer type of a config's `layer_types` -> why scoring cannot hand a completion its group's prompt keys/values.
# Generation shares these prompts still (`prefill_unsupported_reason`): there a layer's state is repeated whole.
_SCORING_CANNOT_SHARE = {
    "sliding_attention": _WINDOW,
    "chunked_attention": _WINDOW,
    "linear_attention": _RECURRENT,
    "conv": _RECURRENT,
    "hybrid": _RECURRENT,
    "hybrid_sliding": _RECURRENT,
}


def _cache_owner_reason(model: nn.Module) -> str | None:
    """Why this model's forward cannot take a prompt cache built here (in scoring or in the prefill), or None."""
    causal_lm = unwrap_causal_lm(model)
    if getattr(causal_lm.config, "is_encoder_decoder", False):
        return f"{type(causal_lm).__name__} is an encoder-decoder model"
    if uses_prompt_learning(model):
        return "prompt-learning adapters (prefix / prompt tuning) already use the KV cache"
    return None


def _backbone_reason(causal_lm: nn.Module) -> str | None:
    """Why the backbone cannot be called with a `cache` (both paths call it so), or None."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if backbone is None or "cache" not in inspect.signature(backbone.forward).parameters:
        return f"{type(causal_lm).__name__}'s backbone takes no `cache` argument"
    if hasattr(backbone, "get_rope_index"):  # positions depend on the images before a token, not only on the mask
        return f"{type(causal_lm).__name__} numbers positions with its images (multimodal rotary positions)"
    return None


# Models whose prompts with images share: the backbone merges the image features into the prompt's embeddings and takes
# explicit multimodal rotary positions (`get_rope_index`: `(3, U, P)` for the prompt, a per-row `rope_deltas` offset for
# the text after it), so the prompt pass computes both once per group and the completion pass adds the offset.
IMAGE_SHARING_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _image_model_reason(causal_lm: nn.Module) -> str | None:
    """Why the prompts with images of this model cannot share (in scoring or in the prefill), or None."""
    if getattr(causal_lm.config, "model_type", None) not in IMAGE_SHARING_MODEL_TYPES:
        return (
            f"the prompts hold images and {type(causal_lm).__name__} is not of a family whose image prompts share "
            f"({', '.join(IMAGE_SHARING_MODEL_TYPES)})"
        )
    backbone = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if backbone is None or not hasattr(backbone, "get_rope_index"):
        return f"{type(causal_lm).__name__}'s backbone has no get_rope_index"
    return None


def image_unsupported_reason(model: nn.Module, training: bool = True) -> str | None:
    """`unsupported_reason` for a rollout whose prompts hold images: why its completions cannot be scored with each
    prompt and its images encoded once per group, or None when they can (Qwen2-VL and Qwen2.5-VL)."""
    causal_lm = unwrap_causal_lm(model)
    if training and _reentrant_checkpointing(causal_lm):
        return _REENTRANT
    return _cache_owner_reason(model) or _image_model_reason(causal_lm) or _scoring_layers_reason(causal_lm)


def _scoring_layers_reason(causal_lm: nn.Module) -> str | None:
    """Scoring hands each completion its group's prompt keys/values, so every layer must attend to all of them: full
    attention only (a sliding window or a recurrent state depends on what came before in a way a shared cache does
    not reproduce)."""
    config = causal_lm.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    for layer_type in dict.fromkeys(layer_types):
        if layer_type != "full_attention":
            why = _SCORING_CANNOT_SHARE.get(layer_type, "a layer type prefix sharing does not know")
            return f"{type(causal_lm).__name__} has {layer_type!r} layers: {why}"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return f"{type(causal_lm).__name__} uses a sliding window"
    return None


# --- Generation ---


def prefill_unsupported_reason(model: nn.Module, generation_config: GenerationConfig) -> str | None:
    """Why `generate` with `generation_config` cannot start from a prompt cache prefilled once per group (e.g. a
    static cache, beam search), or None when it can. Scoring may still share the prompts (`unsupported_reason`)."""
    # Looser than scoring's layer rule: a sliding-window layer's last keys/values and a recurrent layer's running
    # state are each a whole row of state, repeated as such (`cache_rows`)
    return (
        _generation_config_reason(model, generation_config)
        or _cache_owner_reason(model)
        or _backbone_reason(unwrap_causal_lm(model))
        or cache_rows.unsupported_reason(model)
    )


def image_prefill_unsupported_reason(model: nn.Module, generation_config: GenerationConfig) -> str | None:
    """`prefill_unsupported_reason` for prompts with images: why they cannot be prefilled once per group with their
    image features (`shared_image_prompt_cache`), or None when they can (Qwen2-VL and Qwen2.5-VL)."""
    return (
        _generation_config_reason(model, generation_config)
        or _cache_owner_reason(model)
        or _image_model_reason(unwrap_causal_lm(model))
        or cache_rows.unsupported_reason(model)
    )


def _generation_config_reason(model: nn.Module, generation_config: GenerationConfig) -> str | None:
    """Why `generate` with this config cannot continue from a cache repeated along the batch, or None."""
    defaults = unwrap_causal_lm(model).generation_config  # what generate uses for the fields left unset (None)

    def setting(name):
        value = getattr(generation_config, name, None)
        return value if value is not None else getattr(defaults, name, None)

    if setting("use_cache") is False:
        return "generation_config.use_cache is False"
    if (setting("num_beams") or 1) > 1 or (setting("num_return_sequences") or 1) > 1:
        return "beam search / num_return_sequences > 1 expand the batch inside generate"
    if setting("cache_implementation") not in (None, "dynamic"):
        return (
            f"cache_implementation={setting('cache_implementation')!r}: only a DynamicCache can be repeated along "
            "the batch"
        )
    return None


def _prefill_shared_cache(model: nn.Module, input_ids, attention_mask, num_generations: int) -> Cache:
    """KV cache of all but the last token of each unique prompt, repeated G times along the batch `(B*G, ...)`."""
    causal_lm = unwrap_causal_lm(model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    position_ids = position_ids_from_mask(attention_mask)  # (B, P-1)
    cache = DynamicCache(config=causal_lm.config)
    backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
    # every row of prompt state (keys/values, or a recurrent layer's running state) G times in a row
    rows = torch.arange(input_ids.size(0), device=input_ids.device).repeat_interleave(num_generations)  # (B*G,)
    cache_rows.take_rows(cache, rows)
    return cache


@torch.no_grad()
def shared_prompt_cache(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_generations: int
) -> Cache | None:
    """The KV cache of all but the last token of each of the `(B, P)` unique prompts, prefilled once and repeated G
    times along the batch, for decoding the `(B*G, P)` repeated prompts; None when there is nothing to share (one-token
    prompts, G = 1). For a model and config that `prefill_unsupported_reason` accepts (not checked again here)."""
    if input_ids.size(1) < 2 or num_generations < 2:
        return None
    return _prefill_shared_cache(model, input_ids[:, :-1], attention_mask[:, :-1], num_generations)


def image_prompt_positions(backbone: nn.Module, prompt_ids, prompt_mask, image_inputs: dict):
    """The multimodal rotary positions `(3, U, P)` of left-padded prompts with images, and each prompt's `rope_deltas`
    `(U, 1)`: a text token after the prompt's last image sits at its index among the real tokens plus this offset (the
    completion's tokens, as `generate` numbers them). `image_inputs`: the processor's tensors of these prompts
    (`VisionInputs.model_inputs(P, 0)`)."""
    return backbone.get_rope_index(prompt_ids, attention_mask=prompt_mask, **image_inputs)


@torch.no_grad()
def shared_image_prompt_cache(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_generations: int, image_inputs: dict
) -> tuple[Cache, torch.Tensor] | None:
    """`shared_prompt_cache` for the `(B, P)` unique prompts with images (`image_inputs`: their processor tensors,
    `VisionInputs.model_inputs(P, 0)`): the vision encoder runs once per prompt, its features merged into the
    prompt's embeddings by the backbone's own forward, at the multimodal positions of `get_rope_index`. Returns the
    cache of all but the last prompt token repeated G times, and each row's `rope_deltas` `(B*G, 1)`, to add to the
    decoding steps' positions (`position_ids_from_mask` numbering); None when there is nothing to share or a prompt ends
    with an image token (its features would be missing from the prefill). For a model that
    `image_prefill_unsupported_reason` accepts."""
    causal_lm = unwrap_causal_lm(model)
    ends_with_image = bool((input_ids[:, -1] == causal_lm.config.image_token_id).any())
    if input_ids.size(1) < 2 or num_generations < 2 or ends_with_image:
        return None
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    positions, rope_deltas = image_prompt_positions(backbone, input_ids, attention_mask, image_inputs)  # (3, B, P)
    cache = DynamicCache(config=causal_lm.config)
    backbone(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[..., :-1],
        cache=cache,
        use_cache=True,
        **{key: value[:, :-1] if key in TOKEN_ALIGNED else value for key, value in image_inputs.items()},
    )
    rows = torch.arange(input_ids.size(0), device=input_ids.device).repeat_interleave(num_generations)  # (B*G,)
    cache_rows.take_rows(cache, rows)
    return cache, rope_deltas[rows]


@torch.no_grad()
def generate_with_shared_prefix(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_generations: int,
    generation_config: GenerationConfig,
    **generate_kwargs,
) -> torch.Tensor:
    """`model.generate` on each `(B, P)` left-padded unique prompt repeated G times in a row: `(B*G, C)`, rows in
    groups of G, each prompt prefilled once (`shared_prompt_cache`); plain generation on the repeated prompts (one
    warning per reason) when the cache cannot be shared.

    Under greedy decoding the completions are token-identical to `model.generate` on the repeated prompts; under
    sampling they follow the same distribution.
    """
    reason, cache = prefill_unsupported_reason(model, generation_config), None
    if reason is None:
        try:
            cache = shared_prompt_cache(model, input_ids, attention_mask, num_generations)
        except (AttributeError, NotImplementedError, TypeError) as error:
            reason = f"the KV cache of {type(unwrap_causal_lm(model)).__name__} cannot be expanded ({error})"
    if reason is not None:
        warn_plain_path(reason)
    if cache is not None:
        generate_kwargs["cache"] = cache  # generate then feeds only the last prompt token first
    sequences = model.generate(
        input_ids=input_ids.repeat_interleave(num_generations, dim=0),  # (B*G, P)
        attention_mask=attention_mask.repeat_interleave(num_generations, dim=0),
        generation_config=generation_config,
        **without_router_logits(model),
        **generate_kwargs,
    )  # (B*G, P + C)
    return sequences[:, input_ids.size(1) :]


# --- Scoring ---


class _RecordPromptLayer(DynamicLayer):
    """Prompt pass: keeps the first keys/values it sees and attends over them alone (it looks empty to the mask).

    A replay of the layer under gradient checkpointing sees the same inputs and keeps the first record, which is the
    one the completion pass holds.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        if getattr(self, "recorded", None) is None:
            self.recorded = (key_states, value_states)  # (U, H, P, D) each
        return key_states, value_states


class _SharedPromptLayer(DynamicLayer):
    """Completion pass: each completion attends to its group's prompt keys/values, then its own. Never appends, so a
    replay under gradient checkpointing computes exactly what the forward did."""

    def __init__(self, keys, values, group_sizes):
        super().__init__()
        self.keys, self.values = keys, values  # (U, H, P, D)
        self.group_sizes = group_sizes  # (U,)
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        keys = self.keys.repeat_interleave(self.group_sizes, dim=0)  # (N, H, P, D), freed after the cat
        values = self.values.repeat_interleave(self.group_sizes, dim=0)  # (N, H, P, D)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)  # (N, H, P+C, D)


class _CheckpointWithReadOnlyCache:
    """Let gradient-checkpointed layers keep a cache for the duration of one forward: ours never appends, so the
    backward replay reads the same keys/values (`GradientCheckpointingLayer._can_checkpoint_with_cache`)."""

    def __init__(self, backbone: nn.Module):
        self.layers = [m for m in backbone.modules() if getattr(m, "gradient_checkpointing", False)]

    def __enter__(self):
        for layer in self.layers:
            layer._can_checkpoint_with_cache = True

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer._can_checkpoint_with_cache  # back to the class attribute


def _reentrant_checkpointing(causal_lm: nn.Module) -> bool:
    """Reentrant checkpointing runs layers under no_grad and only differentiates their positional tensor inputs,
    so gradients through shared prompt keys/values (held by the cache object) would be lost."""
    for module in causal_lm.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            return getattr(func, "keywords", {}).get("use_reentrant", True) is not False
    return False


@dataclasses.dataclass
class SharedPrefixScoring(ScoringRequest):
    """A `ScoringRequest` run with each prompt encoded once per run of identical rows (the module docstring). With
    `vision` (prompts with images, a model `image_unsupported_reason` accepts) each run's images go through the vision
    encoder once, in the prompt pass; `model_inputs` is then left unset."""

    vision: VisionInputs | None = None  # the rows' image tensors (Rollout.vision)

    def run(self, causal_lm: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> CompletionScores:
        _, group_sizes = prompt_groups(prompt_ids, prompt_mask, self.vision)  # (U,)
        if bool((group_sizes == 1).all()):  # nothing shared in this micro-batch: the plain pass is as cheap
            if self.vision is not None:
                width = (prompt_ids.size(1), self.completion_ids.size(1))
                plain = dataclasses.replace(self, model_inputs=self.vision.model_inputs(*width, prompt_ids.device))
                return ScoringRequest.run(plain, causal_lm, prompt_ids, prompt_mask)
            return super().run(causal_lm, prompt_ids, prompt_mask)
        return _shared_prefix_forward(causal_lm, prompt_ids, prompt_mask, self)


def _shared_prefix_forward(causal_lm, prompt_ids, prompt_mask, request: SharedPrefixScoring) -> CompletionScores:
    """Prompt pass on the unique prompts, completion pass on every completion against the shared prompt cache."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    completion_ids, completion_mask = request.completion_ids, request.completion_mask  # (N, C)
    starts, group_sizes = prompt_groups(prompt_ids, prompt_mask, request.vision)  # (U,), (U,)

    # Positions as the plain path numbers them over [prompt, completion]
    full_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, P+C)
    position_ids = position_ids_from_mask(full_mask)  # (N, P+C)
    prompt_length = prompt_ids.size(1)
    prompt_positions, completion_positions = position_ids[starts, :prompt_length], position_ids[:, prompt_length:]
    image_inputs = {}
    if request.vision is not None:  # each run's images encoded once; multimodal positions (Qwen2-VL's get_rope_index)
        image_inputs = request.vision.select(starts).model_inputs(prompt_length, 0, prompt_ids.device)
        prompt_positions, rope_deltas = image_prompt_positions(
            backbone, prompt_ids[starts], prompt_mask[starts], image_inputs
        )  # (3, U, P), (U, 1)
        completion_positions = completion_positions + rope_deltas.repeat_interleave(group_sizes, dim=0)  # (N, C)

    with _CheckpointWithReadOnlyCache(backbone):
        recorder = Cache(layer_class_to_replicate=_RecordPromptLayer)
        prompt_outputs = backbone(
            input_ids=prompt_ids[starts],
            attention_mask=prompt_mask[starts],
            position_ids=prompt_positions,
            cache=recorder,
            use_cache=False,  # the cache is passed explicitly; use_cache only asks the backbone to create one
            **request.backbone_kwargs(),
            **image_inputs,
        )
        shared = Cache(layers=[_SharedPromptLayer(*layer.recorded, group_sizes) for layer in recorder.layers])
        completion_outputs = backbone(
            input_ids=completion_ids,
            attention_mask=full_mask,
            position_ids=completion_positions,
            cache=shared,
            use_cache=False,
            **request.backbone_kwargs(),
        )
    prompt_hidden = prompt_outputs.last_hidden_state  # (U, P, H)
    completion_hidden = completion_outputs.last_hidden_state  # (N, C, H)

    last_prompt_hidden = prompt_hidden[:, -1:].repeat_interleave(group_sizes, dim=0)  # (N, 1, H): left padding
    hidden_states = torch.cat([last_prompt_hidden, completion_hidden[:, :-1]], dim=1)  # (N, C, H): t predicts t+1
    logps, entropies = score_hidden_states(
        causal_lm,
        hidden_states,
        completion_ids,
        completion_mask.bool(),
        request.temperature,
        request.chunk_size,
        request.entropy_gradients,
    )
    aux_loss = None
    if request.router_aux_loss:  # over the tokens of the plain pass: each prompt once per completion
        router_logits = _router_logits_per_completion(
            prompt_outputs.router_logits, completion_outputs.router_logits, group_sizes, completion_ids.size(1)
        )
        aux_loss = load_balancing_loss(causal_lm, router_logits, full_mask)
    return CompletionScores(logps=logps, entropies=entropies, aux_loss=aux_loss)


def _router_logits_per_completion(prompt_logits, completion_logits, group_sizes, completion_length):
    """Each layer's router logits `(N*(P+C), E)`, rows as the plain pass orders them: the prompt's `(U*P, E)` repeated
    for each completion of its group, then the completion's own `(N*C, E)`."""
    per_layer = []
    for prompt_layer, completion_layer in zip(prompt_logits, completion_logits, strict=True):
        experts = prompt_layer.size(-1)
        prompt_layer = prompt_layer.view(group_sizes.numel(), -1, experts).repeat_interleave(group_sizes, dim=0)
        completion_layer = completion_layer.view(-1, completion_length, experts)  # (N, C, E)
        per_layer.append(torch.cat([prompt_layer, completion_layer], dim=1).flatten(0, 1))  # (N*(P+C), E)
    return tuple(per_layer)


_REENTRANT = "reentrant gradient checkpointing would drop gradients through the shared prompt keys/values"


def unsupported_reason(model: nn.Module, training: bool = True) -> str | None:
    """Why the completions of `model` cannot be scored with each prompt encoded once per group, or None when they can.

    `training`: a pass whose gradients are taken, for which reentrant checkpointing counts. The rollout asks once for
    all its passes (old, reference and policy: training); `shared_prefix_logps` asks for the pass it runs. The
    model's rules and the self-check are run once per model, the answer kept on it.
    """
    causal_lm = unwrap_causal_lm(model)
    if training and _reentrant_checkpointing(causal_lm):
        return _REENTRANT
    reason = getattr(causal_lm, "_grpo_ext_prefix_sharing_reason", None)
    if reason is None:
        reason = (
            _cache_owner_reason(model)
            or _scoring_layers_reason(causal_lm)
            or _backbone_reason(causal_lm)
            or _self_check(model)
        )
        causal_lm._grpo_ext_prefix_sharing_reason = reason  # "" when supported
    return reason or None


def _self_check(model: nn.Module, atol: float = 0.05) -> str:
    """Score a small batch both ways once per model; "" when they agree. Guards against architectures that look
    supported but treat the cache or positions differently. The tolerance allows bf16 rounding; an architectural
    mismatch is off by far more."""
    causal_lm = unwrap_causal_lm(model)
    device = next(causal_lm.parameters()).device
    vocab = causal_lm.get_output_embeddings().out_features
    prompt_ids = (torch.arange(12, device=device).view(2, 6) * 7 + 3).remainder(vocab).repeat_interleave(2, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2:, :2] = 0  # the second prompt is left-padded
    completion_ids = (torch.arange(16, device=device).view(4, 4) * 5 + 1).remainder(vocab)  # (4, 4)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, -1] = 0  # one completion ended early
    modes = {module: module.training for module in causal_lm.modules()}
    causal_lm.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            plain, _ = completion_logps_and_entropies(
                causal_lm,
                torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1),
                completion_ids.size(1),
            )
            shared = _shared_prefix_forward(
                causal_lm, prompt_ids, prompt_mask, SharedPrefixScoring(completion_ids, completion_mask, 1.0, 1024)
            ).logps
            _prefill_shared_cache(causal_lm, prompt_ids[::2, :-1], prompt_mask[::2, :-1], 2)  # generation's cache
        error = (plain - shared).abs().max().item()
    except Exception as exception:  # an architecture the two-pass forward does not fit
        return (
            f"{type(causal_lm).__name__} failed the prefix-sharing self-check ({type(exception).__name__}: {exception})"
        )
    finally:
        for module, training in modes.items():
            module.training = training
    if not error <= atol:
        return f"{type(causal_lm).__name__}: prefix-shared log-probs differ from the plain path by {error:.3g}"
    return ""


def shared_prefix_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies `(N, C)` of the completions, each prompt encoded once per run of identical rows.

    A drop-in for `logprobs.completion_logps_and_entropies(model, cat([prompt_ids, completion_ids]), cat([prompt_mask,
    completion_mask]), C, temperature, chunk_size)`: same values and gradients (up to float rounding), same zeros where
    `completion_mask` is 0, entropies without gradient, never the `(N, T, V)` logits. `prompt_ids` `(N, P)` are
    left-padded and hold each prompt once per completion, groups in consecutive rows (as the trainer's batch does).
    `model` may be wrapped (DDP, PEFT, accelerate) and may be a PEFT model inside `disable_adapter()` (reference pass).
    """
    reason = unsupported_reason(model, training=torch.is_grad_enabled() and unwrap_causal_lm(model).training)
    if reason is not None:
        warn_plain_path(reason)
        return completion_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            temperature=temperature,
            chunk_size=chunk_size,
        )
    request = SharedPrefixScoring(completion_ids, completion_mask, temperature, chunk_size)
    scores = score_completions(model, prompt_ids, prompt_mask, request)
    return scores.logps, scores.entropies
