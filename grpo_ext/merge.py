"""Merged weights of a trained adapter, done right for QLoRA, and what each way of merging costs in outputs.

A QLoRA adapter was trained on the base as bitsandbytes' NF4 weights dequantised at each matmul, not on the
original weights. Merging it into the original full-precision base (what `merge_and_unload` on a freshly loaded base
does) gives a model the adapter never saw; merging into the 4-bit weights is not possible without rounding the
update away. The faithful merge quantises the base to NF4 exactly as training did, dequantises it, and adds the LoRA
update in float32 (`merged_model`). `next_token_drift` measures how far any candidate's next-token distributions are
from the adapter on the base it was trained on, so the cost of each choice (NF4 vs original base, bf16 vs fp32) is a
number, not a guess.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
import yaml
from torch import nn

from .checkpoints import last_complete_checkpoint
from .models import (
    gguf_source,
    keep_4bit_weights_trainable,
    load_causal_lm,
    load_tokenizer,
    peft_checkpointing_read_ignored,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RESOLVED_CONFIG = "resolved_config.yaml"  # written by recipes/deepseek_math_style.py: the run's ModelConfig fields
FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SAMPLING_SETTINGS = ("temperature", "top_p", "top_k")  # the run's, as sampling defaults of an Ollama Modelfile
MERGE_BASES = ("nf4", "original")  # what a QLoRA adapter is merged into: the dequantised NF4 base, or the original

# Short conversations whose every position is scored by `next_token_drift` (teacher forcing: one forward each).
DRIFT_CONVERSATIONS = (
    [{"role": "user", "content": "What is 7 times 8?"}, {"role": "assistant", "content": "7 times 8 is 56."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
    [{"role": "user", "content": "Add 12 and 30."}, {"role": "assistant", "content": "12 + 30 = 42\nAnswer: 42"}],
)


@dataclass(frozen=True)
class TrainedModel:
    """What a run produced and what it was trained on: `folder` holds an adapter (`adapter=True`, on `base`) or a full
    model (`base` is `folder`); `four_bit` holds the bitsandbytes settings of a QLoRA base, else None; `sampling`
    the run's sampling settings (Ollama parameter names), when recorded."""

    folder: str
    base: str
    adapter: bool
    four_bit: dict | None = None
    sampling: dict | None = None


def find_trained_model(run_or_adapter: str, base: str | None = None, base_4bit: bool | None = None) -> TrainedModel:
    """Where the trained weights are and what base they were trained on.

    `run_or_adapter` is an adapter folder, a full-model folder, or a run's `output_dir` (its newest complete
    checkpoint when nothing was saved at the top). The base is `base` if given, else the adapter config's
    `base_model_name_or_path`. QLoRA (`four_bit`) is `base_4bit` if given, else the run's `resolved_config.yaml`
    (`load_in_4bit` and its bitsandbytes fields).
    """
    folder = os.fspath(run_or_adapter)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"RUN_OR_ADAPTER {folder!r} is not a folder: give a run's output_dir or an adapter folder."
        )
    if not _holds_weights(folder) and (checkpoint := last_complete_checkpoint(folder)) is not None:
        logger.info(
            "No adapter or model at the top of %s: exporting its newest complete checkpoint %s", folder, checkpoint
        )
        folder = checkpoint
    settings = _run_settings(folder)
    sampling = {name: settings[name] for name in SAMPLING_SETTINGS if settings.get(name) is not None} or None
    if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as file:
            recorded = json.load(file).get("base_model_name_or_path")
        base = base or recorded or settings.get("model_name_or_path")
        if not base:
            raise ValueError(
                f"{folder}/{ADAPTER_CONFIG} does not name its base model: pass --base (base=) the model it was trained on."
            )
        _check_base_exists(base)
        four_bit = _four_bit_settings(settings, base_4bit)
        if four_bit and gguf_source(base) is not None:
            raise ValueError(
                f"The base {base} is a GGUF file, which is never loaded in 4-bit: convert it once with "
                f"`python -m grpo_ext.models {base} BASE_DIR` and pass --base BASE_DIR, or drop --base-4bit."
            )
        return TrainedModel(folder, base, adapter=True, four_bit=four_bit, sampling=sampling)
    if any(os.path.isfile(os.path.join(folder, name)) for name in FULL_MODEL_FILES):
        return TrainedModel(folder, folder, adapter=False, sampling=sampling)
    raise FileNotFoundError(
        f"No adapter and no model in {folder}: expected {ADAPTER_CONFIG} + adapter_model.safetensors (a LoRA / QLoRA "
        f"run) or model.safetensors (a full fine-tune), at the top or in a complete checkpoint-N folder."
    )


def _holds_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (ADAPTER_CONFIG, *FULL_MODEL_FILES))


def _run_settings(folder: str) -> dict:
    """The recipe's `resolved_config.yaml` of the run (in the folder, or above a checkpoint folder), else {}."""
    for candidate in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(candidate, RESOLVED_CONFIG)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                return yaml.safe_load(file) or {}
    return {}


def _check_base_exists(base: str) -> None:
    """A local base (a path, a .gguf file) must be there; a Hub id is looked up when it is loaded."""
    local = os.path.isabs(base) or base.startswith((".", "~")) or base.lower().endswith(".gguf") or base.count("/") > 1
    if local and not os.path.exists(os.path.expanduser(base)):
        raise FileNotFoundError(
            f"The base model {base!r} the adapter was trained on is missing. Pass --base (base=) the same model at "
            "its new place: merging into any other base changes the model's outputs."
        )


def _four_bit_settings(settings: dict, base_4bit: bool | None) -> dict | None:
    """bitsandbytes settings as TRL's `get_quantization_config` builds them from the run's ModelConfig fields."""
    if base_4bit is False or (base_4bit is None and not settings.get("load_in_4bit")):
        return None
    dtype = settings.get("dtype") if settings.get("dtype") not in (None, "auto") else "float32"
    return {
        "dtype": dtype,
        "bnb_4bit_quant_type": settings.get("bnb_4bit_quant_type") or "nf4",
        "bnb_4bit_use_double_quant": settings.get("use_bnb_nested_quant", True) is not False,
        "bnb_4bit_quant_storage": settings.get("bnb_4bit_quant_storage") or "uint8",
    }


def _bitsandbytes_config(four_bit: dict):
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, four_bit["dtype"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype,  # as TRL: the compute dtype is the run's dtype
        bnb_4bit_quant_type=four_bit["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=four_bit["bnb_4bit_use_double_quant"],
        bnb_4bit_quant_storage=getattr(torch, four_bit["bnb_4bit_quant_storage"]),
    )


def load_base(trained: TrainedModel, *, quantized: bool = False, dequantized: bool = False) -> nn.Module:
    """The base the weights were trained on, in float32: as is, in 4-bit as training loaded it (`quantized`), or
    those 4-bit weights dequantised into plain float32 layers (`dequantized`, what a QLoRA adapter saw)."""
    if not (quantized or dequantized) or trained.four_bit is None:
        return load_causal_lm(trained.base, {"dtype": "float32"}, on_cpu=True).eval()
    kwargs = {"dtype": trained.four_bit["dtype"], "quantization_config": _bitsandbytes_config(trained.four_bit)}
    # as training prepared it: bitsandbytes' CPU repacking (AVX512-BF16) would compute these matmuls in bf16
    model = keep_4bit_weights_trainable(load_causal_lm(trained.base, kwargs, on_cpu=True)).eval()
    if not dequantized:
        return model
    # transformers' own dequantisation: each Linear4bit becomes an nn.Linear holding exactly the weights the 4-bit
    # matmuls used in training, and the quantizer and quantization_config are dropped so the model saves plainly
    return model.dequantize().float()


def adapter_model(trained: TrainedModel, base: nn.Module) -> nn.Module:
    """The trained adapter on `base`, unmerged (the reference the merges are measured against)."""
    from peft import PeftModel

    with peft_checkpointing_read_ignored():
        return PeftModel.from_pretrained(base, trained.folder).eval()


def merged_model(trained: TrainedModel, merge_into: str = "nf4") -> nn.Module:
    """A standalone float32 model: the adapter merged into the dequantised NF4 base (`merge_into="nf4"`, the
    faithful merge of a QLoRA adapter) or into the original base (`"original"`); a full model as it is."""
    if merge_into not in MERGE_BASES:
        raise ValueError(f"merge_into={merge_into!r}: use one of {MERGE_BASES}.")
    if not trained.adapter:
        return load_causal_lm(trained.folder, {"dtype": "float32"}, on_cpu=True).eval()
    base = load_base(trained, dequantized=merge_into == "nf4")
    return adapter_model(trained, base).merge_and_unload().eval()


def trained_tokenizer(trained: TrainedModel):
    """The tokenizer saved with the run (it holds the chat template training used), else the base's."""
    folder = trained.folder
    if any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(folder)
    return load_tokenizer(trained.base)


# --- Drift: next-token distributions against the adapter on its own base ---


@dataclass(frozen=True)
class Drift:
    """KL(reference || candidate) of the next-token distributions, mean and max over scored positions (nats), and
    the fraction of positions whose most likely token is the same (greedy agreement)."""

    name: str
    mean_kl: float
    max_kl: float
    agreement: float
    positions: int

    def row(self) -> str:
        return f"| {self.name} | {self.mean_kl:.2e} | {self.max_kl:.2e} | {self.agreement:.1%} |"


DRIFT_HEADER = "| merged model | mean KL (nats) | max KL (nats) | greedy agreement |\n| --- | --- | --- | --- |"


def drift_batch(tokenizer, conversations=DRIFT_CONVERSATIONS) -> dict:
    """The drift prompts as a padded batch: each conversation through the chat template (plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    else:
        texts = ["\n".join(message["content"] for message in c) for c in conversations]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def next_token_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Float32 log-probabilities of the next token at every position of `batch`, `(B, T, V)`."""
    return torch.log_softmax(model(**batch).logits.float(), dim=-1)


def next_token_drift(name: str, reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> Drift:
    """`Drift` of `candidate` log-probs from `reference` ones (both `(B, T, V)`), over the positions `mask` keeps."""
    kl = (reference.exp() * (reference - candidate)).sum(-1)[mask.bool()].clamp_min(0)  # >= 0 but for rounding
    same = (reference.argmax(-1) == candidate.argmax(-1))[mask.bool()]
    return Drift(name, kl.mean().item(), kl.max().item(), same.float().mean().item(), int(mask.sum()))
