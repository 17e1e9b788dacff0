"""The rollout engine: how G completions per prompt are produced, from dataset rows to a `Rollout`.

rows -> episode (`start`: with environments, each row's instance reset and its tools) -> plan (`plan`: what generation
and scoring can share) -> prompt ids (chat template, left padding, `max_prompt_length`) -> completions (plain
`generate`, each prompt prefilled once per group, finished rows leaving the batch, or transformers' continuous
batching: rollout.generate_completions) -> turns with tools (tools.tool_call_loop, a plug-in) -> `Generation`
(unpadded lists, what `trl.GRPOTrainer._generate` returns) -> `Rollout` (padded tensors and masks, `to_rollout`).
A user's `rollout_func` replaces the middle (`custom_rollout`).

The engine holds settings only. What belongs to one rollout (its plan, its episode) is a value handed along and
returned, so two rollouts never see each other's state. The trainer and the task evaluation (evaluation.py) share
this code: an evaluation answer is generated exactly as a training completion is.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .drafting import DraftMemory
from .rollout import (
    GenerationPlan,
    Rollout,
    build_generation_config,
    continuous_batching_config,
    encode_image_prompts,
    encode_prompts,
    generate_completions,
    is_conversational,
    plan_generation,
    token_lists_until_stop,
)
from .speculative import DraftStats
from .tools import Episode, MultiTurn, ToolCalling, parse_completion, tool_call_loop
from .vision import VisionInputs, has_images, is_processor, prompt_images, tokenizer_of

__all__ = ["Generation", "RolloutEngine", "custom_rollout", "first_turns", "ROLLOUT_FUNC_KEYS"]


@dataclass
class Generation:
    """What one rollout generated, per row (each prompt G times in a row), unpadded: the outputs of
    `trl.GRPOTrainer._generate` (`as_trl`), plus the tool-calling counts."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # every turn, tool results included
    tool_mask: list[list[int]] | None  # 1 on generated tokens, 0 on tool results; None without tools
    completions: list  # as reward functions receive them: text, or the assistant (and tool) messages
    extra_fields: dict = field(default_factory=dict)  # a rollout_func's other keys, passed to the reward functions
    logprobs: list | None = None  # the sampler's, from a rollout_func (unused: no vLLM correction here)
    turns: MultiTurn | None = None  # the tool-calling rounds' counts
    draft_stats: DraftStats | None = None  # with speculative decoding: forwards run, drafts accepted
    images: list | None = None  # each row's prompt images (TRL's `images`), None when no prompt has one
    vision: VisionInputs | None = None  # the processor's image tensors of each row (vision.py)

    @classmethod
    def from_trl(cls, outputs: tuple) -> Generation:
        """From `(prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images)`."""
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, *_ = outputs
        vision = getattr(images, "vision", None)
        return cls(prompt_ids, completion_ids, tool_mask, completions, extra_fields or {}, logprobs, images=images, vision=vision)  # fmt: skip

    def as_trl(self) -> tuple:
        images = RowImages(self.images, self.vision) if self.images is not None else None
        return self.prompt_ids, self.completion_ids, self.tool_mask, self.completions, self.logprobs, self.extra_fields, images, []  # fmt: skip


class RowImages(list):
    """TRL's `images` output of `_generate` (each row's images, a list), carrying the processor's tensors made for
    generation (`vision`) through TRL's tuple, so that the scoring passes use the same ones."""

    def __init__(self, images: list, vision: VisionInputs | None):
        super().__init__(images)
        self.vision = vision


class RolloutEngine:
    """Generates rollouts for a policy with fixed settings (`from_config`: a trainer's). `model` arguments are the
    policy unwrapped for generation (`models.unwrapped_for_generation`), except `plan`'s, which takes it as trained.
    `processing_class` is the tokenizer, or a vision-language model's processor (kept as `processor`; prompts with
    image parts are encoded by it, vision.py)."""

    def __init__(
        self,
        processing_class,
        generation_config,
        stop_token_ids: list[int],
        max_completion_length: int,
        max_prompt_length: int | None = None,
        chat_template_kwargs: dict | None = None,
        pad_to_multiple_of: int | None = None,
        mask_truncated_completions: bool = False,
        prefix_sharing: bool = True,
        drop_finished_rows: bool = True,
        continuous_batching=None,
        tool_calling: ToolCalling | None = None,
        draft_tokens: int = 0,
        draft_ngram_size: int = 3,
        draft_memory: DraftMemory | None = None,
    ):
        self.processor = processing_class if is_processor(processing_class) else None
        self.processing_class = tokenizer_of(processing_class)
        self.generation_config = generation_config
        self.stop_token_ids = stop_token_ids
        self.max_completion_length = max_completion_length
        self.max_prompt_length = max_prompt_length
        self.chat_template_kwargs = chat_template_kwargs
        if tool_calling is not None and tool_calling.chat_template is not None:  # TRL's training template (tools.py)
            self.chat_template_kwargs = {"chat_template": tool_calling.chat_template, **(chat_template_kwargs or {})}
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_truncated_completions = mask_truncated_completions
        self.prefix_sharing = prefix_sharing
        self.drop_finished_rows = drop_finished_rows
        self.continuous_batching = continuous_batching  # a ContinuousBatchingConfig, or None
        self.tool_calling = tool_calling
        self.draft_tokens = draft_tokens
        self.draft_ngram_size = draft_ngram_size
        # Completions of earlier rollouts by prompt, drafts for later epochs: the one state kept across rollouts
        self.draft_memory = draft_memory

    @classmethod
    def from_config(
        cls, args, processing_class, stop_token_ids, sharded: bool = False, tool_calling=None
    ) -> RolloutEngine:
        """The engine of a trainer with `args` (a GRPOExtConfig). `sharded` (DeepSpeed / FSDP): prompts are neither
        shared nor rows dropped (two backbone passes in one forward are untested there, and ranks must run the same
        number of forwards)."""
        generation_config = build_generation_config(args, tokenizer_of(processing_class).pad_token_id, stop_token_ids)
        if is_processor(processing_class) and "suppress_tokens" not in (args.generation_kwargs or {}):
            # As TRL: a sampled image token has no image features. `image_token_ids` holds the token the model fills
            # with image features where it differs from the placeholder `image_token_id` (Gemma 3's soft token).
            image_token_ids = [getattr(processing_class, "image_token_id", None), *processing_class.image_token_ids]
            generation_config.suppress_tokens = list(dict.fromkeys(i for i in image_token_ids if i is not None)) or None
        return cls(
            processing_class,
            generation_config,
            stop_token_ids,
            args.max_completion_length,
            max_prompt_length=args.max_prompt_length,
            chat_template_kwargs=args.chat_template_kwargs,
            pad_to_multiple_of=args.pad_to_multiple_of,
            mask_truncated_completions=args.mask_truncated_completions,
            prefix_sharing=args.prefix_sharing and not sharded,
            drop_finished_rows=args.drop_finished_rows and not sharded,
            continuous_batching=continuous_batching_config(args),
            tool_calling=tool_calling,
            draft_tokens=args.speculative_draft_tokens,
            draft_ngram_size=args.speculative_ngram_size,
            draft_memory=DraftMemory(args.speculative_memory_prompts, per_prompt=args.num_generations)
            if args.speculative_draft_tokens and args.speculative_memory_prompts
            else None,
        )

    def with_drafts(self, draft_tokens: int, draft_memory: DraftMemory | None) -> RolloutEngine:
        """This engine with speculative decoding set to `draft_tokens` per row, drafting from `draft_memory`."""
        engine = copy.copy(self)
        engine.draft_tokens, engine.draft_memory = draft_tokens, draft_memory
        return engine

    def start(self, rows: list[dict]) -> Episode:
        """A new rollout of `rows`: the prompts to generate from and, with tools, each row's tools and environment
        (drawn and reset; its observation appended to the prompt)."""
        prompts = [row["prompt"] for row in rows]
        if self.tool_calling is None:
            return Episode(prompts)
        return self.tool_calling.start(rows, prompts)

    def plan(self, model: nn.Module, generation_config=None, images: bool = False) -> GenerationPlan:
        """What this rollout can use of the sharing and decoding settings (`rollout.plan_generation`), for prompts
        that hold `images` or not."""
        return plan_generation(
            model,
            generation_config or self.generation_config,
            self.prefix_sharing,
            self.drop_finished_rows,
            self.continuous_batching,
            self.draft_tokens,
            self.draft_ngram_size,
            images=images,
        )

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompts: list,
        num_generations: int,
        plan: GenerationPlan,
        episode: Episode | None = None,
        generation_config=None,
        device: torch.device | None = None,
    ) -> Generation:
        """Completions of `prompts` (each prompt `num_generations` times in a row), with the tool-calling rounds when
        the episode gives rows tools. `generation_config` defaults to the engine's (evaluation passes a greedy one)."""
        config = generation_config or self.generation_config
        device = device or next(model.parameters()).device
        row_tools = episode.row_tools if episode is not None else None
        vision, images = None, None
        if has_images(prompts):
            if self.processor is None:
                raise ValueError(
                    "The prompts hold images but the trainer's processing_class is a tokenizer: pass the model's "
                    "processor, processing_class=AutoProcessor.from_pretrained(<model id>)."
                )
            prompt_ids, prompt_mask, vision = encode_image_prompts(
                self.processor,
                prompts,
                self.chat_template_kwargs,
                self.max_prompt_length,
                device,
                self.pad_to_multiple_of,
                tools=row_tools,
            )  # (B, P) each
            images = [prompt_images(prompt) or None for prompt in prompts]
            plan = self.plan(model, config, images=True)  # what prompts with images can share
        else:
            prompt_ids, prompt_mask = encode_prompts(
                self.processing_class,
                prompts,
                self.chat_template_kwargs,
                self.max_prompt_length,
                device,
                tools=row_tools,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )  # (B, P)
        if num_generations == 1:  # nothing to share between the rows of a group of one
            plan = dataclasses.replace(plan, shared_prefill=False)
        draft_stats = DraftStats() if plan.draft_tokens else None
        completion_ids = generate_completions(
            model, prompt_ids, prompt_mask, num_generations, config, plan, self.draft_memory, draft_stats, vision
        )  # (B, C)
        prompt_lists = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
        completion_lists = token_lists_until_stop(completion_ids, self.stop_token_ids)
        conversational = is_conversational(prompts[0])
        completions = first_turns(self.processing_class, prompt_lists, completion_lists, conversational, row_tools)
        if not conversational or not row_tools or not any(row_tools):
            return Generation(
                prompt_lists, completion_lists, None, completions, draft_stats=draft_stats, images=images, vision=vision
            )

        def go_on(history_ids, history_mask, max_new_tokens, rows):  # later turns: one completion per history
            later = copy.deepcopy(config)
            later.max_new_tokens = max_new_tokens
            one_each = GenerationPlan(
                drop_finished_rows=plan.drop_finished_rows, continuous_batching=plan.continuous_batching
            )
            row_vision = None
            if vision is not None:  # the rows' prompt images; their text since the prompt has no image
                so_far = [
                    int(length) - len(prompt_lists[i]) for i, length in zip(rows, history_mask.sum(1), strict=True)
                ]
                row_vision = vision.select(torch.tensor(rows)).followed_by(so_far)
            history_ids, history_mask = history_ids.to(device), history_mask.to(device)
            return generate_completions(model, history_ids, history_mask, 1, later, one_each, vision=row_vision)

        turns = tool_call_loop(
            self.processing_class,
            prompt_lists,
            completion_lists,
            [messages[0] for messages in completions],  # each row's first assistant message
            row_tools,
            go_on,
            self.stop_token_ids,
            self.max_completion_length,
            self.tool_calling.max_iterations,
            getattr(model.config, "max_position_embeddings", None),
            self.chat_template_kwargs,
            self.tool_calling.tool_timeout,
        )
        self.tool_calling.report(turns)
        return Generation(
            prompt_lists, turns.completion_ids, turns.tool_mask, turns.completions, turns=turns, draft_stats=draft_stats,
            images=images, vision=vision,
        )  # fmt: skip

    def to_rollout(self, generation: Generation, plan: GenerationPlan, device: torch.device) -> Rollout:
        """The padded tensors of a generation `(B, P)` / `(B, C)`, masked after each completion's first stop token;
        its scoring passes share the prompts when the plan does."""
        pad_token_id = self.processing_class.pad_token_id
        rollout = Rollout.of_token_lists(
            generation.prompt_ids,
            generation.completion_ids,
            generation.tool_mask,
            pad_token_id,
            self.stop_token_ids,
            self.mask_truncated_completions,
            plan.shared_prefix,
            device,
        ).padded(self.pad_to_multiple_of, pad_token_id)
        if generation.vision is None and generation.images is not None and any(generation.images):
            raise NotImplementedError(
                "_generate returned images without grpo-ext's image tensors (a subclass's _generate or a rollout_func): "
                "rollouts with images are generated by grpo-ext's own _generate only, for now."
            )
        rollout.vision = generation.vision
        return rollout


def first_turns(
    tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]], conversational: bool, row_tools=None
) -> list:
    """What reward functions receive as `completions`: each completion's text, or for conversational prompts its
    assistant message in a list (`tools.parse_completion`, with the row's tools when given)."""
    if not conversational:
        return tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    row_tools = row_tools or [None] * len(completion_ids)
    return [
        [parse_completion(tokenizer, ids, prefix, tools)]
        for ids, prefix, tools in zip(completion_ids, prompt_ids, row_tools, strict=True)
    ]


ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs")


def custom_rollout(rollout_func: Callable, prompts: list, trainer, tokenizer) -> Generation:
    """TRL's `rollout_func(prompts, trainer)`, checked. It returns unpadded `prompt_ids` / `completion_ids`, one row
    per prompt it was given (the rollout's rows, each prompt G times), and `logprobs`; `env_mask` (1 on the tokens the
    model generated) becomes the tool mask; other keys are passed on to the reward functions."""
    name = getattr(rollout_func, "__name__", type(rollout_func).__name__)
    try:
        output = rollout_func(prompts, trainer)
    except Exception as error:
        raise RuntimeError(
            f"rollout_func '{name}' raised {type(error).__name__}: {error} (on {len(prompts)} prompts; see the "
            "traceback above for where)."
        ) from error
    if not isinstance(output, dict):
        raise TypeError(
            f"rollout_func '{name}' returned a {type(output).__name__}; it must return a dict with keys "
            f"{list(ROLLOUT_FUNC_KEYS)} (and optionally env_mask and extra fields for the reward functions)."
        )
    missing = sorted(set(ROLLOUT_FUNC_KEYS) - set(output))
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict (it returned {sorted(output)}).")
    extra_fields = {key: value for key, value in output.items() if key not in ROLLOUT_FUNC_KEYS}
    tool_mask = extra_fields.pop("env_mask", None)
    prompt_ids = [list(ids) for ids in output["prompt_ids"]]
    completion_ids = [list(ids) for ids in output["completion_ids"]]
    if not len(prompt_ids) == len(completion_ids) == len(prompts):
        raise ValueError(
            f"rollout_func returned {len(prompt_ids)} prompt_ids and {len(completion_ids)} completion_ids for "
            f"{len(prompts)} prompts: return one row per prompt it receives (each prompt comes num_generations times)."
        )
    completions = first_turns(tokenizer, prompt_ids, completion_ids, is_conversational(prompts[0]))
    return Generation(prompt_ids, completion_ids, tool_mask, completions, extra_fields, output["logprobs"])
