"""Reward functions for math RL (accuracy, format, length) and a neural reward model wrapper.

Every function follows TRL's contract `f(prompts, completions, completion_ids, **columns) -> list[float | None]`:
completions are strings or, for conversational prompts, lists of messages (the last message is scored); dataset
columns such as `answer` / `solution` arrive as keyword arguments; None means "not scored".

* `accuracy_reward`: symbolic answer check with math-verify (DeepSeekMath, DeepSeek-R1); needs `grpo-ext[math]`.
* `answer_line_reward`: the same check on a last line `Answer: <x>` only (a strict accuracy for prompts that ask
  for that line).
* `r1_format_reward`, `tag_count_reward`: DeepSeek-R1's `<think>` / `<answer>` layout.
* `answer_format_reward`: a last line `Answer: <number>`, right or wrong (the form alone: a surface-only reward).
* `get_cosine_scaled_reward` (arXiv 2502.03373), `get_soft_overlong_reward` (DAPO, arXiv 2503.14476): factories.
* `NeuralRewardModel`: a sequence-classification reward model (optionally with a LoRA adapter) as a reward function.
* `REWARD_FUNCS`, `get_reward_funcs`: look rewards up by name or dotted import path.
"""

from .accuracy import accuracy_reward, answer_line_reward
from .format import answer_format_reward, r1_format_reward, tag_count_reward
from .length import get_cosine_scaled_reward, get_soft_overlong_reward
from .registry import REWARD_FUNCS, get_reward_funcs

__all__ = [
    "REWARD_FUNCS",
    "NeuralRewardModel",
    "accuracy_reward",
    "answer_format_reward",
    "answer_line_reward",
    "get_cosine_scaled_reward",
    "get_reward_funcs",
    "get_soft_overlong_reward",
    "r1_format_reward",
    "tag_count_reward",
]


def __getattr__(name):
    # NeuralRewardModel pulls in torch and transformers; rule-based rewards should not pay for that on import.
    if name == "NeuralRewardModel":
        from .neural import NeuralRewardModel

        return NeuralRewardModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
