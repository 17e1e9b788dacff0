"""Accuracy reward: 1.0 when the completion's final answer equals the gold answer, checked symbolically.

This is the rule-based outcome reward of DeepSeekMath (arXiv 2402.03300, sec. 4) and DeepSeek-R1 (arXiv 2501.12948,
sec. 2.2.2, "accuracy rewards"): the final answer is pulled out of the completion in a fixed place and compared with
the reference. Equivalence (`\\frac{1}{2}` == `0.5`, `1,000` == `1000`, `\\$18` == `18`) is decided by the
`math-verify` package, which parses both sides to SymPy.

Where the answer is taken from:

* gold: after `####` (GSM8K, thousands separators dropped), else the last `\\boxed{...}` (MATH solutions), else the
  whole string (a plain number or expression);
* completion: the last `\\boxed{...}`, else the content of the last `<answer>...</answer>`, else the last number or
  inline math span (`$...$`, `\\(...\\)`) in the text.

An extracted answer that reads as prose ("18 dollars", "The answer is 7") is reduced to its last number or inline math
span. A gold answer that cannot be parsed gives `None` (not scored) rather than a misleading 0.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from functools import lru_cache

from ._text import completion_text

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5
"""Per-expression limit for math-verify's parsing and comparison (signal based: main thread on POSIX only)."""

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A minus sign counts only when it is not a binary minus ("3-4" is 3 and 4, not 3 and -4).
_NUMBER = r"(?:(?<![\w)\]}])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?"
# The last of these in a text is its fallback answer: display/inline math spans, or a bare number.
_MATH_OR_NUMBER = re.compile(
    rf"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<!\\)\$([^$]+?)(?<!\\)\$|({_NUMBER})", re.DOTALL
)
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"(?<![\w\\])[A-Za-z]{2,}(?!\w)")
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc sinh cosh tanh arcsin arccos arctan log ln lg exp sqrt pi mod gcd lcm min max det".split()
)


def _math_verify():
    """The math-verify functions, imported on first use so the rest of the package works without it."""
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as error:
        raise ImportError("accuracy_reward needs math-verify: pip install 'grpo-ext[math]'") from error
    return parse, verify, LatexExtractionConfig


def _timeout() -> int | None:
    """math-verify times out with `signal.alarm`, which only works on the main thread on POSIX; elsewhere, no limit."""
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return TIMEOUT_SECONDS
    return None


# --- finding the answer in a text ---


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included."""
    content = None
    for match in _BOX_OPEN.finditer(text):
        depth = 1
        for end in range(match.end(), len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    content = text[match.end() : end]
                    break
    return content


def last_math_or_number(text: str) -> str | None:
    """The last inline/display math span's content or bare number in `text`, or None when there is neither."""
    matches = list(_MATH_OR_NUMBER.finditer(text))
    return matches[-1].group(matches[-1].lastindex) if matches else None


def extract_answer(text: str) -> str | None:
    """The completion's final answer: last `\\boxed{}`, else last `<answer>` content, else last number or math span."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    return last_math_or_number(text)


def gold_expression(gold) -> str:
    """The reference answer: after `####` (GSM8K), else the last `\\boxed{}` (MATH), else the whole string."""
    text = str(gold)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


# --- parsing an answer to SymPy ---


def _strip_delimiters(expression: str) -> str:
    expression = expression.strip().rstrip(".").strip()
    for opening, closing in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if len(expression) > len(opening) + len(closing) and expression.startswith(opening):
            if expression.endswith(closing):
                expression = expression[len(opening) : -len(closing)].strip()
    return expression


def _is_prose(expression: str) -> bool:
    """Words outside LaTeX commands and `\\text{}`: two or more, one of three letters or more, or one beside a digit.

    `2xy`, `x + y`, `\\sqrt{2}`, `18 \\text{ dollars}` and `ab` are math; `18 dollars`, `18 cm` and `The answer is 7`
    are prose.
    """
    bare = _COMMAND.sub(" ", _TEXT_GROUP.sub(" ", expression))
    words = [word for word in _WORD.findall(bare) if word.lower() not in _MATH_WORDS]
    return len(words) >= 2 or any(len(word) >= 3 for word in words) or bool(words and re.search(r"\d", bare))


def parse_answer(expression: str | None, timeout: int | None = None) -> list:
    """Parse one extracted answer to math-verify's list of SymPy candidates (empty when it cannot be parsed)."""
    if expression is None:
        return []
    expression = _strip_delimiters(expression)
    if not expression:
        return []
    if _is_prose(expression):
        tail = last_math_or_number(expression)
        if tail is None or tail.strip() == expression:
            return []
        return parse_answer(tail, timeout)
    parse, _, LatexExtractionConfig = _math_verify()
    return parse(
        f"${expression}$",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=-1)],
        fallback_mode="no_fallback",
        parsing_timeout=timeout,
    )


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    """Gold answers repeat once per generation in a group: parse each one once."""
    return tuple(parse_answer(gold_expression(gold), timeout))


def answer_is_correct(text: str, gold) -> bool | None:
    """Whether the final answer in `text` equals `gold`; None when the gold answer cannot be parsed."""
    if gold is None:
        return None
    timeout = _timeout()
    gold_parsed = _parse_gold(str(gold), timeout)
    if not gold_parsed:
        return None
    try:
        predicted = parse_answer(extract_answer(text), timeout)
        if not predicted:
            return False
        _, verify, _ = _math_verify()
        return bool(verify(list(gold_parsed), predicted, timeout_seconds=timeout))
    except ImportError:
        raise
    except Exception:  # math-verify swallows its own errors; this guards SymPy corner cases on odd model output
        logger.debug("accuracy_reward could not compare %r with %r", text[-200:], gold, exc_info=True)
        return False


def gold_answers(completions, answer=None, solution=None) -> list:
    """The gold column (`answer`, else `solution`), one per completion; a single value is repeated."""
    golds = answer if answer is not None else solution
    if golds is None:
        raise ValueError(
            "accuracy_reward needs the reference answer: give the dataset an `answer` column (GSM8K style, "
            "'... #### 42', or a plain value) or a `solution` column (a MATH solution with \\boxed{})."
        )
    if isinstance(golds, (str, int, float)):
        golds = [golds] * len(completions)
    if len(golds) != len(completions):
        raise ValueError(f"accuracy_reward got {len(golds)} gold answers for {len(completions)} completions.")
    return list(golds)


def accuracy_reward(completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold `answer` (or `solution`), else 0.0; None if unparsable gold."""
    rewards = []
    for completion, gold in zip(completions, gold_answers(completions, answer, solution), strict=True):
        correct = answer_is_correct(completion_text(completion), gold)
        rewards.append(None if correct is None else float(correct))
    return rewards


_ANSWER_LINE = re.compile(r"^\s*\**Answer:?\**:?\s*(.*?)\s*$", re.IGNORECASE)


def answer_line_reward(completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's last line reads `Answer: <x>` and x equals the gold answer, else 0.0 (None if the gold
    answer cannot be parsed).

    The strict metric for prompts that ask "End your reply with 'Answer: <number>'": the right number in the place the
    prompt asked for it. It never pays for the format alone, so a policy cannot earn it with "Answer: 12" for every
    question; `accuracy` beside it pays for the right number anywhere.
    """
    rewards = []
    for completion, gold in zip(completions, gold_answers(completions, answer, solution), strict=True):
        lines = [line for line in completion_text(completion).splitlines() if line.strip()]
        match = _ANSWER_LINE.fullmatch(lines[-1]) if lines else None
        correct = answer_is_correct(match.group(1), gold) if match and match.group(1) else False
        rewards.append(None if correct is None or gold is None else float(bool(correct)))
    return rewards
