"""One rollout: G completions per prompt sampled from the policy, as the tensors the loss needs (`Rollout`).

prompts -> token ids (chat template, left padding, `max_prompt_length`) -> completions (`generate`, or each prompt
prefilled once: prefix_sharing.py) -> mask after the first stop token -> text for the reward functions. The trainer
then adds the old / reference log-probs (`completion_logps`) and the advantages, concatenates rollouts for dynamic
sampling and splits one into micro-batches.

How a rollout is generated is decided here once per rollout (`plan_generation`): whether prompts are shared
(prefix_sharing.py) in scoring and in generation's prefill, and whether finished rows leave the decoding batch
(decoding.py), drafting the next tokens from the group (speculative.py). Sharing travels with the rollout (`Rollout.shared_prefix`): every scoring pass of its completions takes
the same path. Generation may prefill every row while scoring shares (a static cache cannot be repeated per group).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from . import decoding, prefix_sharing, speculative
from .drafting import DraftMemory, GroupDrafts
from .logprobs import CompletionScores, ScoringRequest, score_completions
from .models import unwrap_causal_lm
from .moe import without_router_logits
from .objective import Normalisers
from .vision import VisionInputs, prompt_images, tokenizer_of

__all__ = [
    "Rollout",
    "is_conversational",
    "prompt_texts",
    "encode_prompts",
    "encode_image_prompts",
    "pad_to_multiple",
    "eos_token_ids",
    "build_generation_config",
    "GenerationPlan",
    "continuous_batching_config",
    "plan_generation",
    "generate_completions",
    "completion_mask_after_eos",
    "pad_token_lists",
    "token_lists_until_stop",
    "score_rollout",
    "length_buckets_of",
    "micro_batches",
    "varying_groups",
]


# Fields `(B, C)` aligned with the completion tokens (the others are `(B, P)` or `(B,)`)
_PER_TOKEN = ("completion_ids", "completion_mask", "tool_mask", "old_per_token_logps", "ref_per_token_logps")


@dataclass
class Rollout:
    """A batch of completions, rows in groups of G (each prompt repeated once per completion)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) anything after the first stop token (the last, with tools) is padding
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first stop token (the last, with tools)
    lengths: torch.Tensor | None = None  # (B,) completion tokens, stop token (and tool results) included
    is_truncated: torch.Tensor | None = None  # (B,) no stop token within max_completion_length
    shared_prefix: bool = False  # prompts encoded once per group, in generation and in scoring
    old_per_token_logps: torch.Tensor | None = None  # (B, C) pi_old, when the policy moves before this is trained on
    ref_per_token_logps: torch.Tensor | None = None  # (B, C) pi_ref, when a KL term needs it
    advantages: torch.Tensor | None = None  # (B,)
    group_std: torch.Tensor | None = None  # (B,) std of each completion's group rewards (dynamic sampling)
    normalisers: Normalisers | None = None  # what the loss divides by, set on micro-batches for training
    tool_mask: torch.Tensor | None = None  # (B, C) with tools: 1 on generated tokens, 0 on tool results and padding
    pad_to_multiple_of: int | None = None  # prompt and completion widths kept a multiple of it (`padded`)
    vision: VisionInputs | None = None  # a vision-language model's image tensors, per row (vision.py)

    @classmethod
    def of_token_lists(
        cls,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        tool_mask: list[list[int]] | None,
        pad_token_id: int,
        eos_token_ids: list[int],
        mask_truncated_completions: bool = False,
        shared_prefix: bool = False,
        device=None,
    ) -> Rollout:
        """The rollout of unpadded prompts and completions (as `trl.GRPOTrainer._generate` returns them): prompts
        left-padded, completions right-padded; a completion is masked by its own length, not after its first stop
        token (with tools a completion holds one end-of-turn token per turn), and is truncated when it does not end
        with a stop token."""
        prompt_ids_, prompt_mask = pad_token_lists(prompt_ids, pad_token_id, "left", device)  # (B, P) each
        completion_ids_, completion_mask = pad_token_lists(completion_ids, pad_token_id, "right", device)  # (B, C)
        lengths = completion_mask.sum(1)  # (B,)
        is_truncated = torch.tensor([not ids or ids[-1] not in eos_token_ids for ids in completion_ids], device=device)
        if mask_truncated_completions:
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1)
        tool_mask_ = None
        if tool_mask is not None:
            tool_mask_, _ = pad_token_lists(tool_mask, 0, "right", device)  # (B, C)
        return cls(
            prompt_ids_, prompt_mask, completion_ids_, completion_mask, lengths, is_truncated, shared_prefix,
            tool_mask=tool_mask_,
        )  # fmt: skip

    @property
    def loss_mask(self) -> torch.Tensor:
        """`(B, C)` the tokens the policy is scored on: the completion's, less tool results (context, not actions)."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * self.tool_mask

    def model_inputs(self, completion_width: int | None = None) -> dict[str, torch.Tensor]:
        """The extra keyword arguments of a forward over these rows' prompts and `completion_width` completion columns
        (all of them by default; 0 for `generate`): a vision-language model's image tensors, else none."""
        if self.vision is None:
            return {}
        width = self.completion_ids.size(1) if completion_width is None else completion_width
        return self.vision.model_inputs(self.prompt_ids.size(1), width, self.prompt_ids.device)

    @property
    def generated_lengths(self) -> torch.Tensor:
        """`(B,)` tokens the model generated (tool results left out): what the length metrics count."""
        return self.lengths if self.tool_mask is None else self.tool_mask.sum(1)

    @classmethod
    def from_dict(cls, inputs: dict, max_completion_length: int) -> Rollout:
        """A batch given as TRL's trainers pass one to `compute_loss`: a dict of tensors under the field names, plus
        the window's counts `num_sequences`, `num_tokens` and `num_tokens_per_process` when it is trained on."""
        fields = {f.name for f in dataclasses.fields(cls)}
        rollout = cls(**{key: value for key, value in inputs.items() if key in fields})
        if "num_sequences" in inputs:
            rollout.normalisers = Normalisers(
                num_sequences=inputs["num_sequences"],
                num_tokens=inputs["num_tokens"],
                num_global_tokens=inputs.get("num_tokens_per_process", inputs["num_tokens"]),
                max_completion_length=max_completion_length,
            )
        return rollout

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))
        }

    def rows(self, start: int, stop: int) -> Rollout:
        """Rows `start:stop` of every tensor (a group, a micro-batch)."""
        return self.select(slice(start, stop))

    def select(self, rows: slice | torch.Tensor) -> Rollout:
        """The given rows (a slice, or row indices `(b,)`) of every tensor, and their images."""
        vision = self.vision.select(rows) if self.vision is not None else None
        return dataclasses.replace(self, **{name: t[rows] for name, t in self._tensors().items()}, vision=vision)

    def split(self, parts: int) -> list[Rollout]:
        """`parts` equal consecutive slices (micro-batches), each trimmed to its own longest completion."""
        size = len(self) // parts
        return [self.rows(i * size, (i + 1) * size).trimmed() for i in range(parts)]

    def padded(self, multiple: int | None, pad_token_id: int) -> Rollout:
        """Prompts padded on the left and completions (with their per-token tensors) on the right to a multiple of
        `multiple` columns (TRL's `pad_to_multiple_of`); `trimmed` micro-batches then keep widths that are multiples.
        Exact: the padding is masked out, and a causal model never lets a token see the padding after it."""
        if multiple is None:
            return self
        prompts = {
            "prompt_ids": pad_to_multiple(self.prompt_ids, multiple, pad_token_id, "left"),
            "prompt_mask": pad_to_multiple(self.prompt_mask, multiple, 0, "left"),
        }
        per_token = {name: t for name, t in self._tensors().items() if name in _PER_TOKEN}
        values = {"completion_ids": pad_token_id}  # masks and log-probs pad with 0
        per_token = {name: pad_to_multiple(t, multiple, values.get(name, 0), "right") for name, t in per_token.items()}
        return dataclasses.replace(self, **prompts, **per_token, pad_to_multiple_of=multiple)

    def trimmed(self) -> Rollout:
        """The same rollout without the completion columns that are padding in every row: a micro-batch of short
        completions then costs its own length in the scoring passes, not the rollout's longest. Exact: a causal model
        never lets a token see the padding after it, and the loss only reads masked-in positions. The width stays a
        multiple of `pad_to_multiple_of` when set."""
        in_use = self.completion_mask.any(0).nonzero()  # columns with at least one scored token
        width = int(in_use[-1]) + 1 if in_use.numel() else 1
        if self.pad_to_multiple_of is not None:
            width = min(-(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of, self.completion_ids.size(1))
        if width == self.completion_ids.size(1):
            return self
        per_token = {name: t[:, :width] for name, t in self._tensors().items() if name in _PER_TOKEN}
        return dataclasses.replace(self, **per_token)

    @classmethod
    def concat(cls, rollouts: list[Rollout]) -> Rollout:
        """Stack rollouts of different padded lengths: prompts stay left-padded, completions and their per-token
        tensors right-padded (with 0, masked out), per-completion tensors `(B,)` concatenated."""

        def stack(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            if tensors[0].dim() == 1:
                return torch.cat(tensors)
            width = max(t.size(1) for t in tensors)
            left = name.startswith("prompt")
            pad = [(width - t.size(1), 0) if left else (0, width - t.size(1)) for t in tensors]
            return torch.cat([torch.nn.functional.pad(t, p) for t, p in zip(tensors, pad, strict=True)])

        first = rollouts[0]
        merged = {name: stack(name, [getattr(r, name) for r in rollouts]) for name in first._tensors()}
        vision = VisionInputs.concat([r.vision for r in rollouts]) if first.vision is not None else None
        return dataclasses.replace(first, **merged, vision=vision)


def pad_to_multiple(tensor: torch.Tensor, multiple: int | None, value: int | float, side: str) -> torch.Tensor:
    """`tensor` `(B, T)` with columns of `value` added on `side` ("left" or "right") up to a multiple of `multiple`
    columns `(B, ceil(T / multiple) * multiple)`; as it is when `multiple` is None."""
    missing = -tensor.size(1) % multiple if multiple else 0
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (missing, 0) if side == "left" else (0, missing), value=value)


# --- Prompts ---


def is_conversational(prompt) -> bool:
    """A conversational prompt is a list of {"role", "content"} messages, as in TRL."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_texts(
    prompts: list, tokenizer, chat_template_kwargs: dict | None = None, tools: list[list] | None = None
) -> list[str]:
    """Prompt strings to tokenize: the chat template with the generation prompt for conversations (and each row's
    tool schema, `tools[i]` the functions row i may call), else as is."""
    if is_conversational(prompts[0]):
        return [
            tokenizer.apply_chat_template(
                prompt,
                tools=(tools[i] or None) if tools else None,  # None, not []: some templates render boilerplate for []
                tokenize=False,
                add_generation_prompt=True,
                **(chat_template_kwargs or {}),
            )
            for i, prompt in enumerate(prompts)
        ]
    return list(prompts)


def encode_prompts(
    tokenizer,
    prompts: list,
    chat_template_kwargs: dict | None,
    max_prompt_length: int | None,
    device,
    tools: list[list] | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask `(B, P)` of the prompts, left-padded (generation appends on the right), keeping
    each prompt's last `max_prompt_length` tokens; `P` a multiple of `pad_to_multiple_of` when given."""
    encoded = tokenizer(
        prompt_texts(prompts, tokenizer, chat_template_kwargs, tools),
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
    )
    prompt_ids, prompt_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)  # (B, P)
    if max_prompt_length is not None:  # left-padded: the last columns hold each prompt's last tokens
        prompt_ids, prompt_mask = prompt_ids[:, -max_prompt_length:], prompt_mask[:, -max_prompt_length:]
    prompt_ids = pad_to_multiple(prompt_ids, pad_to_multiple_of, tokenizer.pad_token_id, "left")
    prompt_mask = pad_to_multiple(prompt_mask, pad_to_multiple_of, 0, "left")
    return prompt_ids, prompt_mask


# --- Generation ---


def encode_image_prompts(
    processor,
    prompts: list,
    chat_template_kwargs: dict | None,
    max_prompt_length: int | None,
    device,
    pad_to_multiple_of: int | None = None,
    tools: list[list] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, VisionInputs]:
    """Token ids and attention mask `(B, P)` of prompts with images, left-padded, and their `VisionInputs`. Each
    prompt is rendered by the processor's chat template (with row i's tool schema, `tools[i]`) and processed with
    its images (placeholders expanded to the image's tokens); consecutive equal prompts (a group) are processed once
    and share their tensors. A prompt longer than `max_prompt_length` is an error: cutting it could cut image tokens
    from their pixels."""
    tokenizer = tokenizer_of(processor)
    texts = prompt_texts(prompts, processor, chat_template_kwargs, tools)
    prompt_ids, rows, previous = [], [], None
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        images = prompt_images(prompt)
        if previous is None or not _same_prompt(text, images, previous):
            encoded = processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)
            ids = encoded["input_ids"][0].tolist()
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                raise ValueError(
                    f"Row {i} of the batch: the prompt is {len(ids)} tokens with its {len(images)} image(s) "
                    f"expanded, more than max_prompt_length={max_prompt_length}; prompts of a batch with images are "
                    "not cut (image tokens must stay with their pixels). Raise max_prompt_length (or set it to None), "
                    "or use smaller images (the image processor's max_pixels / size)."
                )
            extra = {
                k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask") and torch.is_tensor(v)
            }
            previous = (text, images, ids, extra)
        prompt_ids.append(previous[2])
        rows.append(previous[3])
    ids, mask = pad_token_lists(prompt_ids, tokenizer.pad_token_id, "left", device)  # (B, P) each
    ids = pad_to_multiple(ids, pad_to_multiple_of, tokenizer.pad_token_id, "left")
    mask = pad_to_multiple(mask, pad_to_multiple_of, 0, "left")
    return ids, mask, VisionInputs(rows)


def _same_prompt(text: str, images: list, previous: tuple) -> bool:
    """Whether a prompt equals the previous one: same text, same images (a dataset decodes each row's image anew)."""
    previous_text, previous_images, *_ = previous
    if text != previous_text or len(images) != len(previous_images):
        return False
    return all(
        a is b or (a.size, a.mode, a.tobytes()) == (b.size, b.mode, b.tobytes())
        for a, b in zip(images, previous_images, strict=True)
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Where a completion stops: the tokenizer's EOS plus every EOS the model's generation config declares (a chat
    model's end-of-turn token, e.g. `<|im_end|>`, often differs from the tokenizer's EOS)."""
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return [token for token in dict.fromkeys([tokenizer.eos_token_id, *declared]) if token is not None]


def build_generation_config(args, pad_token_id: int, eos_token_ids: list[int]) -> GenerationConfig:
    """Sampling settings from the config; `generation_kwargs` override the named fields."""
    settings = dict(
        max_new_tokens=args.max_completion_length,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        cache_implementation=args.cache_implementation,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids,
    )
    settings.update(args.generation_kwargs or {})
    return GenerationConfig(**settings)


def continuous_batching_config(args):
    """The `ContinuousBatchingConfig` of `use_transformers_continuous_batching`, or None when it is off. As in TRL,
    `max_memory_percent` defaults to 0.5 (transformers: 0.9) to leave memory for the backward pass."""
    if not args.use_transformers_continuous_batching:
        return None
    from transformers.generation import ContinuousBatchingConfig

    return ContinuousBatchingConfig(
        **{"max_memory_percent": 0.5, **(args.transformers_continuous_batching_config or {})}
    )


_IMAGES_REASON = "the prompts hold images (drafting is not built for them yet)"


@dataclass(frozen=True)
class GenerationPlan:
    """How one rollout is generated and scored, decided once per rollout (`plan_generation`)."""

    shared_prefix: bool = False  # each prompt encoded once per group in every scoring pass
    drop_finished_rows: bool = False  # decoding.generate_dropping_finished instead of model.generate
    shared_prefill: bool = False  # each prompt prefilled once per group for generation (needs a DynamicCache)
    draft_tokens: int = 0  # speculative.generate_with_drafts with up to this many drafts per row (0: off)
    draft_ngram_size: int = 3  # the longest n-gram a draft is looked up by
    # transformers' continuous batching (`generate_batch`) with this ContinuousBatchingConfig instead of either loop
    continuous_batching: Any = None


def plan_generation(
    model: nn.Module,
    generation_config: GenerationConfig,
    prefix_sharing_wanted: bool,
    drop_finished_rows_wanted: bool,
    continuous_batching=None,
    draft_tokens: int = 0,
    draft_ngram_size: int = 3,
    images: bool = False,
) -> GenerationPlan:
    """What this rollout can use of what the config asks for (the policy `model`, before it is unwrapped for
    generation). Each reason not to is warned about once per process. A rollout with `images` (vision.py) shares its
    prompts, images included, where `prefix_sharing.image_unsupported_reason` allows (Qwen2-VL, Qwen2.5-VL): each
    prompt is prefilled once with its images and decoded by the loop that drops finished rows, else `model.generate`
    with every row's images; no drafting. `continuous_batching` (a `ContinuousBatchingConfig`): generation runs on
    transformers' engine, which neither drops rows our way nor takes a prefilled cache; scoring may still share the
    prompts. `draft_tokens` > 0: speculative decoding with drafts from the group (`speculative.py`), within the loop
    that drops finished rows."""

    def usable(wanted: bool, unsupported_reason, warn, *settings) -> bool:
        reason = unsupported_reason(model, *settings) if wanted else None
        if reason is not None:
            warn(reason)
        return wanted and reason is None

    if images:
        return _plan_with_images(
            usable,
            prefix_sharing_wanted,
            drop_finished_rows_wanted,
            generation_config,
            continuous_batching,
            draft_tokens,
        )
    shared_prefix = usable(prefix_sharing_wanted, prefix_sharing.unsupported_reason, prefix_sharing.warn_plain_path)
    if continuous_batching is not None:
        return GenerationPlan(shared_prefix=shared_prefix, continuous_batching=continuous_batching)
    drop_finished_rows = usable(
        drop_finished_rows_wanted, decoding.unsupported_reason, decoding.warn_generate, generation_config
    )
    drafts = usable(draft_tokens > 0, speculative.unsupported_reason, speculative.warn_plain_decoding)
    if draft_tokens > 0 and not drop_finished_rows:
        speculative.warn_plain_decoding("it runs in the loop that drops finished rows, which this rollout cannot use")
    return GenerationPlan(
        shared_prefix=shared_prefix,
        drop_finished_rows=drop_finished_rows,
        draft_tokens=draft_tokens if drafts and drop_finished_rows else 0,
        draft_ngram_size=draft_ngram_size,
        shared_prefill=usable(  # asked apart from scoring: a recurrent state is shared in generation only
            prefix_sharing_wanted,
            prefix_sharing.prefill_unsupported_reason,
            prefix_sharing.warn_plain_prefill,
            generation_config,
        ),
    )


def _plan_with_images(
    usable, prefix_sharing_wanted, drop_finished_rows_wanted, generation_config, continuous_batching, draft_tokens
) -> GenerationPlan:
    """`plan_generation` for prompts with images: the prefill shares only into the loop that drops finished rows
    (`generate` cannot be handed the rows' multimodal position offsets), and that loop runs only after it (its own
    prefill takes no images)."""
    shared_prefix = usable(
        prefix_sharing_wanted, prefix_sharing.image_unsupported_reason, prefix_sharing.warn_plain_path
    )
    if draft_tokens > 0:
        speculative.warn_plain_decoding(_IMAGES_REASON)
    if continuous_batching is not None:
        return GenerationPlan(shared_prefix=shared_prefix, continuous_batching=continuous_batching)
    shared_prefill = usable(
        prefix_sharing_wanted,
        prefix_sharing.image_prefill_unsupported_reason,
        prefix_sharing.warn_plain_prefill,
        generation_config,
    )
    if shared_prefill and not drop_finished_rows_wanted:
        prefix_sharing.warn_plain_prefill(
            "prompts with images are prefilled once per group only for the loop that drops finished rows "
            "(drop_finished_rows=False)"
        )
    decoding_reason = decoding.unsupported_reason if shared_prefill else lambda *_: _NO_IMAGE_PREFILL
    drop_finished_rows = usable(
        drop_finished_rows_wanted, decoding_reason, decoding.warn_generate, generation_config, True
    )
    return GenerationPlan(
        shared_prefix=shared_prefix, drop_finished_rows=drop_finished_rows, shared_prefill=drop_finished_rows
    )


_NO_IMAGE_PREFILL = "the prompts hold images and are not prefilled once per group (the loop's own prefill takes none)"


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_generations: int,
    generation_config: GenerationConfig,
    plan: GenerationPlan,
    draft_memory: DraftMemory | None = None,
    draft_stats: speculative.DraftStats | None = None,
    vision: VisionInputs | None = None,
) -> torch.Tensor:
    """Completion ids `(B, C)` for the `(B, P)` prompts, each prompt repeated G times in a row. With drafting, earlier
    completions come from and go to `draft_memory`, and `draft_stats` counts what the drafts saved. `vision`: the
    rows' image tensors (a vision-language model's prompts with images, `_generate_with_images`)."""
    if vision is not None:
        return _generate_with_images(model, prompt_ids, prompt_mask, num_generations, generation_config, plan, vision)
    if plan.continuous_batching is not None:
        return _generate_batch(model, prompt_ids, prompt_mask, generation_config, plan.continuous_batching)
    # An evaluation batch may cut a group across processes: then there is no whole group to prefill once
    unique = prefix_sharing.unique_prompts(prompt_ids, prompt_mask, num_generations) if plan.shared_prefill else None
    cache = prefix_sharing.shared_prompt_cache(model, *unique, num_generations) if unique is not None else None
    if plan.draft_tokens:
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
        drafts = GroupDrafts(prompts, num_generations, plan.draft_tokens, plan.draft_ngram_size, draft_memory)
        completion_ids = speculative.generate_with_drafts(
            model, prompt_ids, prompt_mask, generation_config, drafts, cache=cache, stats=draft_stats
        )
        if draft_memory is not None:
            drafts.remember(draft_memory)
        return completion_ids
    if plan.drop_finished_rows:
        return decoding.generate_dropping_finished(model, prompt_ids, prompt_mask, generation_config, cache=cache)
    sequences = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=generation_config,
        **({"cache": cache} if cache is not None else {}),  # generate then feeds only the last prompt token first
        **without_router_logits(model),
    )  # (B, P + C)
    return sequences[:, prompt_ids.size(1) :]


def _generate_with_images(model, prompt_ids, prompt_mask, num_generations, generation_config, plan, vision):
    """Completions `(B, C)` of prompts with images: each group's prompt prefilled once, its images encoded once
    (`prefix_sharing.shared_image_prompt_cache`), then the loop that drops finished rows with each row's multimodal
    position offset; `model.generate` with every row's images when the plan or the batch (no whole groups) does not
    share."""
    if plan.continuous_batching is not None or plan.draft_tokens:
        raise ValueError(f"a rollout with images is generated by grpo-ext's loop or model.generate, not with {plan}")
    width = prompt_ids.size(1)
    unique = prefix_sharing.unique_prompts(prompt_ids, prompt_mask, num_generations) if plan.shared_prefill else None
    if unique is not None and prefix_sharing.groups_share_images(vision, num_generations):
        image_inputs = vision.select(slice(0, None, num_generations)).model_inputs(width, 0, prompt_ids.device)
        prefilled = prefix_sharing.shared_image_prompt_cache(model, *unique, num_generations, image_inputs)
        if prefilled is not None:
            cache, rope_deltas = prefilled  # (B*G, ...) rows of prompt state, (B*G, 1)
            return decoding.generate_dropping_finished(
                model, prompt_ids, prompt_mask, generation_config, cache=cache, position_offsets=rope_deltas
            )
    sequences = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=generation_config,
        **without_router_logits(model),
        **vision.model_inputs(width, 0, prompt_ids.device),
    )  # (B, P + C)
    return sequences[:, width:]


def _generate_batch(model, prompt_ids, prompt_mask, generation_config, batching_config) -> torch.Tensor:
    """transformers' continuous batching on the unpadded prompts; completions right-padded to `(B, C)`."""
    causal_lm = unwrap_causal_lm(model)
    was_training = causal_lm.training
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    outputs = causal_lm.generate_batch(
        prompts, generation_config=generation_config, continuous_batching_config=batching_config, progress_bar=False
    )  # {request id: GenerationOutput}, in the order of the prompts
    causal_lm.train(was_training)  # the engine leaves the model in eval mode
    completions = [list(output.generated_tokens) for output in outputs.values() if output.error is None]
    if len(completions) != len(prompts):
        raise RuntimeError(
            f"transformers' continuous batching returned {len(completions)} completions for {len(prompts)} prompts "
            "(see its errors above); set use_transformers_continuous_batching=False to generate with grpo-ext's loop."
        )
    completion_ids, _ = pad_token_lists(completions, generation_config.pad_token_id, "right", prompt_ids.device)
    return completion_ids  # (B, C)


def pad_token_lists(
    sequences: list[list[int]], pad_value: int, side: str, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one `(B, L)` tensor padded on `side` ("left" or "right") with `pad_value`, and its mask."""
    width = max(1, max(len(ids) for ids in sequences))
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, L)
    for row, sequence in enumerate(sequences):
        if sequence:
            columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
            ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
            mask[row, columns] = 1
    return ids.to(device), mask.to(device)


def token_lists_until_stop(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> list[list[int]]:
    """Each `(B, C)` completion's ids up to and including its first stop token (all of them when it has none)."""
    completion_mask, _ = completion_mask_after_eos(completion_ids, eos_token_ids)  # (B, C)
    return [ids[: int(n)].tolist() for ids, n in zip(completion_ids, completion_mask.sum(1), strict=True)]


def completion_mask_after_eos(
    completion_ids: torch.Tensor, eos_token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS, 0 after it `(B, C)`; and whether each completion was truncated `(B,)`."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))  # (B, C)
    has_eos = is_eos.any(dim=1)  # (B,)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.size(1))  # (B,)
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)  # (C,)
    completion_mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()  # (B, C)
    return completion_mask, ~has_eos


def score_rollout(
    model: nn.Module,
    rollout: Rollout,
    temperature: float,
    chunk_size: int,
    entropy_gradients: bool = False,
    length_buckets: bool = True,
    router_aux_loss: bool = False,
) -> CompletionScores:
    """Per-token log-probs and entropies `(B, C)` of the rollout's completions under `model` (policy, or the
    reference), by the path the rollout was generated with. Entropies carry a gradient with `entropy_gradients`; with
    `router_aux_loss`, the scores also hold the MoE load-balancing loss of the whole rollout (moe.py).

    With `length_buckets`, rows of very uneven lengths are scored in a few passes of similar lengths
    (`length_buckets_of`), each as wide as its own longest completion, instead of one pass as wide as the longest of
    all: the same values (each row is scored on its own; a causal model never lets a token see the padding after it),
    fewer padding tokens. Leave it off with several processes: the number of forwards then depends on each process's lengths, and
    wrappers that synchronise in the forward (FSDP, ZeRO-3) or allow one forward per backward (DDP) need them equal.
    The load-balancing loss is not a sum over rows, so with `router_aux_loss` the rollout is scored in one pass.
    """
    request_type = prefix_sharing.SharedPrefixScoring if rollout.shared_prefix else ScoringRequest

    def score(part: Rollout) -> CompletionScores:
        # Shared prompts with images: each run's images are batched in the prompt pass, once (not every row's)
        images = {"vision": part.vision} if rollout.shared_prefix and part.vision is not None else None
        request = request_type(
            part.completion_ids, part.completion_mask, temperature, chunk_size, entropy_gradients, router_aux_loss,
            **(images or {"model_inputs": part.model_inputs()}),
        )  # fmt: skip
        return score_completions(model, part.prompt_ids, part.prompt_mask, request)

    buckets = length_buckets_of(rollout.completion_mask) if length_buckets and not router_aux_loss else []
    if len(buckets) <= 1:
        return score(rollout)
    width = rollout.completion_ids.size(1)
    scored = [score(rollout.select(rows).trimmed()) for rows in buckets]  # (b, w_b) tensors per bucket
    order = torch.cat(buckets).argsort()  # row i of the rollout is row order[i] of the buckets stacked
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.size(1)))  # noqa: E731 - back to (b, C), zeros
    logps = torch.cat([pad(scores.logps) for scores in scored])[order]  # (B, C)
    entropies = torch.cat([pad(scores.entropies) for scores in scored])[order]  # (B, C)
    return CompletionScores(logps=logps, entropies=entropies)


def length_buckets_of(completion_mask: torch.Tensor, most: int = 4, saving: float = 0.2) -> list[torch.Tensor]:
    """Rows `(b,)` per bucket: the rows sorted by completion length, cut into 1, 2, 3 ... `most` parts of equal size
    while each more part saves at least `saving` of the padded tokens of the fewer parts; each bucket's rows in their
    original order (a group's rows stay consecutive, so prefix sharing still finds them)."""
    lengths = completion_mask.sum(1)  # (B,) scored tokens of each row, its last column in use
    order = lengths.argsort(stable=True)  # (B,) shortest first
    best, best_cost = [order], lengths.max().item() * lengths.numel()
    for parts in range(2, min(most, lengths.numel()) + 1):
        buckets = list(order.tensor_split(parts))
        cost = sum(lengths[rows].max().item() * rows.numel() for rows in buckets)  # tokens computed, padding included
        if cost > (1 - saving) * best_cost:
            break
        best, best_cost = buckets, cost
    return [rows.sort().values for rows in best]


# --- Dynamic sampling ---


def micro_batches(
    rollout: Rollout, steps: int, accumulation: int, max_completion_length: int, accelerator
) -> list[Rollout]:
    """Slice a rollout into `steps` (steps_per_generation) micro-batches and attach the normalisers of their window.

    The window is the `accumulation` (gradient_accumulation_steps) micro-batches summed into one optimizer step. When
    the rollout covers whole windows (steps a multiple of accumulation, the default), counts are exact; otherwise they
    are the rollout's counts scaled to one window, as TRL does. Token counts are summed over processes.
    """
    parts = rollout.split(steps)
    tokens = torch.stack([part.loss_mask.sum() for part in parts]).float()  # (steps,)
    if steps % accumulation == 0:
        window_tokens = tokens.view(-1, accumulation).sum(1).repeat_interleave(accumulation)  # (steps,)
    else:
        window_tokens = tokens.sum().expand(steps) * accumulation / steps
    global_window_tokens = accelerator.reduce(window_tokens.clone(), reduction="sum")  # (steps,)
    for i, part in enumerate(parts):
        part.normalisers = Normalisers(
            num_sequences=float(len(part) * accumulation),
            num_tokens=float(window_tokens[i]),
            num_global_tokens=float(global_window_tokens[i]) / accelerator.num_processes,
            max_completion_length=max_completion_length,
        )
    return parts


def varying_groups(group_std: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per group `(N/G,)`: whether its rewards vary. A group whose G rewards are equal has zero advantages and no
    policy gradient (DAPO's dynamic sampling, arXiv 2503.14476, drops it)."""
    std = group_std.view(-1, num_generations)[:, 0]  # (N/G,) the same value for every member
    return ~(torch.isclose(std, torch.zeros_like(std)) | torch.isnan(std))
