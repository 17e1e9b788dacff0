"""Loading the policy: a model id or path (optionally 4-bit through bitsandbytes) and LoRA / QLoRA set-up."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def _resolve_dtype(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for key in ("dtype", "torch_dtype"):
        value = kwargs.get(key)
        if isinstance(value, str) and value != "auto":
            kwargs[key] = getattr(torch, value)
    return kwargs


def load_causal_lm(model: str | nn.Module, model_init_kwargs: dict | None = None) -> nn.Module:
    """The policy: `model` itself when it is already a module, else `AutoModelForCausalLM.from_pretrained(model)`."""
    if not isinstance(model, str):
        return model
    return AutoModelForCausalLM.from_pretrained(model, **_resolve_dtype(model_init_kwargs or {}))


def load_tokenizer(model: nn.Module):
    """The policy's tokenizer, read from where the model was loaded; left padding and truncation, as GRPO needs."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not name:
        raise ValueError(
            "The model was built in memory and has no path to load a tokenizer from: pass processing_class=tokenizer."
        )
    return AutoTokenizer.from_pretrained(name, padding_side="left", truncation_side="left")


def four_bit_config(compute_dtype: torch.dtype = torch.bfloat16):
    """QLoRA's quantization (arXiv 2305.14314): NF4 weights, double quantization, matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_4bit_weights_trainable(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns `model`.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) rewrites a `Linear4bit` weight in place, the first time the layer
    runs in eval mode without grad, into a layout that only its inference kernel reads. A GRPO step alternates such
    passes (the log-prob self-check, scoring under `no_grad`) with training passes on the same weights, and the
    repacked path then breaks training: it adds the bias in place on a tensor that needs grad (a RuntimeError) and it
    fails outright on layers narrower than one quantization block (64). GPUs never take that path; nothing changes there.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
            module.support_avx512bf16_for_cpu = False
    return model


def apply_peft(model: PreTrainedModel, peft_config, gradient_checkpointing: bool) -> nn.Module:
    """Wrap the model in a PEFT adapter; with gradient checkpointing the inputs must require grad for LoRA to learn."""
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - peft is a runtime dependency
        raise ImportError("peft_config needs peft: pip install peft") from error
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "The model already has a PEFT adapter and peft_config was given too: pass either the PeftModel (and no "
            "peft_config) or the base model with peft_config."
        )
    model = get_peft_model(model, peft_config)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
