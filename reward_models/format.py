"""Format rewards: did the completion lay out its reasoning and answer in DeepSeek-R1's tags?

DeepSeek-R1 (arXiv 2501.12948, sec. 2.2.2, "format rewards") rewards putting the thinking process between `<think>`
and `</think>` and the answer between `<answer>` and `</answer>`. `r1_format_reward` is that all-or-nothing check;
`tag_count_reward` is the denser variant used by open-r1, a quarter point per correctly placed tag, which gives a
signal before the model gets the whole layout right.
"""

from __future__ import annotations

import re

from ._text import completion_texts

# Neither block may contain a think/answer tag itself, so "exactly one think block, then one answer block".
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
_R1_FORMAT = re.compile(rf"<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>", re.DOTALL)

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
