"""Length-shaped rewards: cosine scaling by correctness (arXiv 2502.03373) and DAPO's soft overlong punishment.

Both are factories: they take the schedule's parameters and return a reward function with TRL's contract.
"""

from __future__ import annotations

import math

from trl.rewards import get_soft_overlong_punishment

from ._text import completion_texts
from .accuracy import answer_is_correct, gold_answers


def _lengths(completions, completion_ids) -> list[int]:
    """Completion lengths in tokens from `completion_ids` (what TRL passes), else in characters of the text."""
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(text) for text in completion_texts(completions)]


def cosine_schedule(length: int, max_len: int, value_at_zero: float, value_at_max: float) -> float:
    """`value_at_max + (value_at_zero - value_at_max) * (1 + cos(pi * length / max_len)) / 2`, length clipped to max_len.

    This is CosFn of "Demystifying Long Chain-of-Thought Reasoning in LLMs" (arXiv 2502.03373, eq. 1), written with
    the values at the two ends rather than eta_min / eta_max.
    """
    progress = min(length, max_len) / max_len
    return value_at_max + 0.5 * (value_at_zero - value_at_max) * (1.0 + math.cos(math.pi * progress))


def get_cosine_scaled_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
):
    """A reward that is positive for correct answers, negative for wrong ones, and shaped by length with a cosine.

    From "Demystifying Long CoT" (arXiv 2502.03373, sec. 3.2): a correct answer gets `max_value_correct` at length 0
    falling to `min_value_correct` at `max_len`, so shorter correct reasoning is preferred; a wrong answer gets
    `min_value_wrong` at length 0 rising to `max_value_wrong` at `max_len`, so the model is encouraged to think longer
    when it is wrong. Lengths beyond `max_len` get the `max_len` value. Correctness is `accuracy_reward`'s, from the
    `answer` / `solution` column; None where the gold answer cannot be parsed. Lengths are tokens (`completion_ids`),
    or characters when no ids are given.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}.")

    def cosine_scaled_reward(completions, completion_ids=None, answer=None, solution=None, **kwargs):
        golds = gold_answers(completions, answer, solution)
        rewards = []
        for text, length, gold in zip(
            completion_texts(completions), _lengths(completions, completion_ids), golds, strict=True
        ):
            correct = answer_is_correct(text, gold)
            if correct is None:
                rewards.append(None)
            elif correct:
                rewards.append(cosine_schedule(length, max_len, max_value_correct, min_value_correct))
            else:
                rewards.append(cosine_schedule(length, max_len, min_value_wrong, max_value_wrong))
        return rewards

    return cosine_scaled_reward


def get_soft_overlong_reward(max_completion_len: int, soft_punish_cache: int):
    """DAPO's soft overlong punishment (arXiv 2503.14476, sec. 3.4) as a reward function over `completion_ids`.

    Completions up to `max_completion_len - soft_punish_cache` tokens get 0; within the last `soft_punish_cache`
    tokens the penalty grows linearly to -1 at `max_completion_len`; longer ones get -1. Add it to a correctness
    reward, as DAPO does.
    """
    if max_completion_len <= 0:
        raise ValueError(f"max_completion_len must be positive, got {max_completion_len}.")
    if not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(
            f"soft_punish_cache must be between 0 and max_completion_len ({max_completion_len}), got {soft_punish_cache}."
        )

    r_length = get_soft_overlong_punishment(max_completion_len, soft_punish_cache)  # TRL's: the same formula

    def soft_overlong_reward(completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError(
                "soft_overlong_reward measures length in tokens and needs `completion_ids` (GRPO trainers pass them)."
            )
        return r_length(completion_ids)

    return soft_overlong_reward
