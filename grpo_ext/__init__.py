"""grpo-ext: GRPO (DeepSeekMath) fine-tuning with 4-bit QLoRA on one GPU, built on TRL."""

import importlib

__version__ = "0.1.0"
__all__ = ["GRPOExtConfig", "GRPOExtTrainer", "__version__"]

# Loaded on first use (PEP 562), so `import grpo_ext`, `python -m grpo_ext.plan --help` and any light submodule do
# not pay for the trainer's stack (TRL, transformers, datasets, peft) until it is needed.
_LAZY = {"GRPOExtConfig": ".config", "GRPOExtTrainer": ".trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
