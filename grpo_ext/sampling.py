"""Group sampling and rollouts: each prompt G times in a row, then G completions per prompt, masked after EOS.

The sampler is TRL's `RepeatSampler`, which the trainer uses as it is (it already keeps groups whole across processes
and repeats the generation batch for `num_iterations x steps_per_generation` steps). Prefix-shared generation lives in
`prefix_sharing.py`; dynamic sampling's loop in the trainer (`_roll_out_varying_groups`), its group test here.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

__all__ = [
    "is_conversational",
    "prompt_texts",
    "eos_token_ids",
    "build_generation_config",
    "completion_mask_after_eos",
    "varying_groups",
    "concat_rollouts",
]


def is_conversational(prompt) -> bool:
    """A conversational prompt is a list of {"role", "content"} messages, as in TRL."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_texts(prompts: list, tokenizer, chat_template_kwargs: dict | None = None) -> list[str]:
    """Prompt strings to tokenize: the chat template with the generation prompt for conversations, else as is."""
    if is_conversational(prompts[0]):
        return [
            tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
            )
            for prompt in prompts
        ]
    return list(prompts)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Where a completion stops: the tokenizer's EOS plus every EOS the model's generation config declares (a chat
    model's end-of-turn token, e.g. `<|im_end|>`, often differs from the tokenizer's EOS)."""
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return list(dict.fromkeys([tokenizer.eos_token_id, *declared]))


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
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids,
    )
    settings.update(args.generation_kwargs or {})
    return GenerationConfig(**settings)


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


def varying_groups(group_std: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per group `(N/G,)`: whether its rewards vary. A group whose G rewards are equal has zero advantages and no
    policy gradient (DAPO's dynamic sampling, arXiv 2503.14476, drops it)."""
    std = group_std.view(-1, num_generations)[:, 0]  # (N/G,) the same value for every member
    return ~(torch.isclose(std, torch.zeros_like(std)) | torch.isnan(std))


def concat_rollouts(rollouts: list[dict]) -> dict:
    """Stack rollouts of different padded lengths: prompts stay left-padded, completions and their per-token
    tensors right-padded (with 0, masked out), per-completion tensors `(N,)` concatenated."""
    merged = {}
    for key in rollouts[0]:
        tensors = [rollout[key] for rollout in rollouts]
        if tensors[0].dim() == 1:
            merged[key] = torch.cat(tensors)
            continue
        width = max(t.size(1) for t in tensors)
        left = key.startswith("prompt")
        padded = [
            torch.nn.functional.pad(t, (width - t.size(1), 0) if left else (0, width - t.size(1))) for t in tensors
        ]
        merged[key] = torch.cat(padded)
    return merged
