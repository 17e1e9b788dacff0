"""Getting the text out of a completion, whatever form TRL hands it in."""

from __future__ import annotations


def _content(message) -> str:
    """A message's text; multimodal content (a list of `{"type": "text", "text": ...}` parts) is joined."""
    if not isinstance(message, dict):
        return "" if message is None else str(message)
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def completion_text(completion) -> str:
    """The text of one completion: the string itself, or the last message's content for a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        return _content(completion[-1]) if completion else ""
    return _content(completion)


def completion_texts(completions) -> list[str]:
    return [completion_text(completion) for completion in completions]
