"""A learned reward model as a reward function: a sequence classifier scores prompt + completion with one logit.

DeepSeekMath (arXiv 2402.03300, sec. 4.1) trains its policy with GRPO against a reward model's scalar output; this
wraps any `transformers` sequence-classification model with `num_labels=1` (plus an optional PEFT LoRA adapter) in
TRL's reward-function contract, so it can sit in `reward_funcs` beside rule-based rewards.
"""

from __future__ import annotations

import os
import re

import torch

from ._text import completion_text


def _basename(name: str) -> str:
    base = os.path.basename(str(name).rstrip("/\\")) or "model"
    return re.sub(r"\W+", "_", base).strip("_") or "model"


class NeuralRewardModel:
    """Scores completions with a sequence-classification reward model: `__call__(prompts, completions) -> list[float]`.

    Args:
        model_or_path: a loaded `PreTrainedModel` (one label) or a local path / model id to load one from.
        tokenizer: the reward model's tokenizer; by default loaded from the model's path.
        adapter_path: a PEFT (LoRA) adapter to load on top of the model.
        batch_size: completions scored per forward pass.
        device: where to run; by default the model's device (a model loaded here stays on the CPU unless given one).
        max_length: truncate inputs to this many tokens, keeping the end (the completion) of long inputs.
        chat_template_kwargs: passed to the tokenizer's chat template for conversational prompts.
        name: the name metrics use (`rewards/<name>/mean`); by default `reward_model_<model folder name>`.
        **model_kwargs: passed to `from_pretrained` when loading from a path (e.g. `dtype=torch.bfloat16`).

    Conversational prompts (lists of messages) are joined with their completion and rendered with the tokenizer's chat
    template; plain prompts are concatenated with the completion text. As in TRL, no extra special tokens are added
    and batches are right padded, the model reading its score at the last non-padding token.
    """

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        adapter_path: str | os.PathLike | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        chat_template_kwargs: dict | None = None,
        name: str | None = None,
        **model_kwargs,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if isinstance(model_or_path, (str, os.PathLike)):
            path = str(model_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_kwargs)
        else:
            model = model_or_path
            path = getattr(model.config, "_name_or_path", "") or type(model).__name__
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(
                f"A reward model has one output label; {path} has {model.config.num_labels}. Load it with num_labels=1."
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path))
        if device is not None:
            model = model.to(device)

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.adapter_path = adapter_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.__name__ = name or f"reward_model_{_basename(path)}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def texts(self, prompts, completions) -> list[str]:
        """The strings the model reads: chat-templated conversations, or prompt + completion."""
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):
                reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
                texts.append(
                    self.tokenizer.apply_chat_template(prompt + reply, tokenize=False, **self.chat_template_kwargs)
                )
            else:
                texts.append(prompt + completion_text(completion))
        return texts

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """One scalar per text, `batch_size` texts per forward pass."""
        scores = []
        truncation_side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"  # keep the completion's end, where the score is read
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    add_special_tokens=False,
                )
                logits = self.model(**{key: value.to(self.device) for key, value in batch.items()}).logits  # (b, 1)
                scores.extend(logits[:, 0].float().cpu().tolist())
        finally:
            self.tokenizer.truncation_side = truncation_side
        return scores

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return self.score(self.texts(prompts, completions))

    def __repr__(self) -> str:
        adapter = f", adapter_path={str(self.adapter_path)!r}" if self.adapter_path is not None else ""
        return f"NeuralRewardModel({self.__name__!r}{adapter}, batch_size={self.batch_size}, device={self.device})"
