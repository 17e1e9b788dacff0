"""Format rewards: did the completion lay out its reasoning and answer in DeepSeek-R1's tags?

DeepSeek-R1 (arXiv 2501.12948, sec. 2.2.2, "format rewards") rewards putting the thinking process between `<think>`
and `</think>` and the answer between `<answer>` and `</answer>`. `r1_format_reward` is that all-or-nothing check;
`tag_count_reward` is the denser variant used by open-r1, a quarter point per correctly placed tag, which gives a
signal before the model gets the whole layout right. `answer_format_reward` checks the layout of prompts that ask
"End your reply with 'Answer: <number>'" (a last line `Answer: <number>`), whatever the number.

Alone, a format reward pays for a surface feature: a policy earns it without solving anything. Pair it with an
accuracy reward (`python -m grpo_ext.doctor` names a reward that pays on completions a task metric marks wrong).
"""

from __future__ import annotations

import re

from ._text import completion_texts

# Neither block may contain a think/answer tag itself, so "exactly one think block, then one answer block".
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
_R1_FORMAT = re.compile(rf"<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>", re.DOTALL)

# A last line "Answer: 42" (also "**Answer:** -3.5", "answer: 1,000."): a number, nothing else
_ANSWER_FORMAT = re.compile(r"\s*\**answer:?\**:?\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*\.?\s*", re.IGNORECASE)

TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
"""The four tags `tag_count_reward` looks for, with the newlines that R1's template puts around them."""


def r1_format_reward(completions, **kwargs) -> list[float]:
    """1.0 if the completion is `<think>...</think>` then `<answer>...</answer>` and nothing else, else 0.0.

    Whitespace may separate the two blocks and surround the whole completion; text outside the blocks, a missing or
    repeated block, or the blocks in the other order give 0.0.
    """
    return [1.0 if _R1_FORMAT.fullmatch(text.strip()) else 0.0 for text in completion_texts(completions)]


def tag_count_reward(completions, **kwargs) -> list[float]:
    """0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>` that appears exactly once."""
    return [sum(0.25 for tag in TAGS if text.count(tag) == 1) for text in completion_texts(completions)]


def answer_format_reward(completions, **kwargs) -> list[float]:
    """1.0 if the completion's last non-empty line is `Answer: <number>`, else 0.0, whether or not the number is right.

    The form alone: "Answer: 12" for every question earns it. `answer_line` (reward_models.accuracy) is the same line
    with the right number; this one exists to show a surface-only reward (recipes/configs/smollm2-135m-cpu-broken.yaml)
    and as a small shaping term beside an accuracy reward.
    """
    rewards = []
    for text in completion_texts(completions):
        lines = [line for line in text.splitlines() if line.strip()]
        rewards.append(1.0 if lines and _ANSWER_FORMAT.fullmatch(lines[-1]) else 0.0)
    return rewards
