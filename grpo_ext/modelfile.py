"""An Ollama `Modelfile` beside an exported GGUF file: the chat template translated to Ollama's Go template, the stop
tokens training used and sampling defaults.

Only ChatML-style templates (`<|im_start|>role\\ncontent<|im_end|>\\n`, SmolLM2's and Qwen's) are translated, and only
after checking it: the tokenizer's own template is rendered on probe conversations and must give exactly ChatML's
text, a default system prompt (SmolLM2's, Qwen's) included. Any other template gets a Modelfile without TEMPLATE and
a note saying so (LM Studio and llama.cpp read the Jinja template from the GGUF metadata instead).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

MODELFILE = "Modelfile"

# Ollama's Go template for ChatML; `.Messages` holds the system prompt (the Modelfile's SYSTEM when the request has
# none), then the conversation; the generation prompt ends it.
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_PROBE = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2 + 2?"},
]
_PROBE_SYSTEM = {"role": "system", "content": "Be brief."}


def _chatml(messages: Sequence[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def chatml_default_system(tokenizer) -> str | None:
    """The default system prompt of a ChatML-style chat template (None when it adds none); a ValueError when the
    template does not render ChatML exactly."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("The tokenizer has no chat template.")
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    if render([_PROBE_SYSTEM, *_PROBE]) != _chatml([_PROBE_SYSTEM, *_PROBE]):
        raise ValueError("The chat template is not ChatML-style (<|im_start|>role ... <|im_end|>).")
    without_system = render(_PROBE)
    if without_system == _chatml(_PROBE):
        return None
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", without_system, flags=re.DOTALL)
    if default is None or without_system != _chatml([{"role": "system", "content": default.group(1)}, *_PROBE]):
        raise ValueError("The chat template adds text to a conversation without a system turn that is not ChatML.")
    return default.group(1)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f'Cannot write {text!r} in a Modelfile: it contains """.')
    return f'"""{text}"""'


def build_modelfile(gguf_file: str, tokenizer, stop_tokens: Sequence[str], sampling: dict | None = None) -> str:
    """The Modelfile text for `gguf_file` (a name in the same folder): TEMPLATE and SYSTEM from a ChatML-style chat
    template, `PARAMETER stop` for each stop token, `sampling` (Ollama parameter -> value) as PARAMETER lines."""
    lines = [
        "# Ollama: ollama create my-model -f Modelfile && ollama run my-model",
        "# LM Studio / llama.cpp: load the .gguf file itself (its chat template is in the metadata).",
        f"FROM ./{gguf_file}",
    ]
    try:
        system = chatml_default_system(tokenizer)
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
        if system is not None:
            lines.append(f"SYSTEM {_quoted(system)}")
    except ValueError as reason:
        note = f"{reason} Not translated to Ollama's TEMPLATE: write one by hand (see Ollama's Modelfile docs)."
        logger.warning("Modelfile: %s", note)
        lines.append(f"# TEMPLATE not written: {note}")
    lines += [f'PARAMETER stop "{token}"' for token in dict.fromkeys(stop_tokens)]
    lines += [f"PARAMETER {name} {value}" for name, value in (sampling or {}).items() if value is not None]
    return "\n".join(lines) + "\n"
