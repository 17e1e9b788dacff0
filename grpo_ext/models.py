"""Loading the policy: a model id or path, a GGUF file, optionally 4-bit through bitsandbytes; LoRA / QLoRA set-up.

python -m grpo_ext.models MODEL.gguf OUTPUT_DIR   # a GGUF checkpoint, dequantised once into a safetensors folder
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import types
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, PreTrainedModel

from . import cpu
from .plan import fit_batch_size, load_model_config
from .vision import is_vision_model, tokenizer_of

logger = logging.getLogger(__name__)

MODEL_DTYPES = ("bfloat16", "float16", "float32", "auto")  # the strings `model_init_kwargs["dtype"]` accepts, as TRL


def model_dtype(model_init_kwargs: dict) -> torch.dtype | str | None:
    """The dtype a model id or path is loaded in, by TRL's rule (`trl.trainer.utils.create_model_from_path`):
    `model_init_kwargs["dtype"]` (or its old name `torch_dtype`) as a `torch.dtype`, `"auto"` (the checkpoint's own),
    None, or one of `"bfloat16"`, `"float16"`, `"float32"`; float32 when not set. Anything else raises, naming the
    field."""
    value = model_init_kwargs.get("dtype", model_init_kwargs.get("torch_dtype", "float32"))
    if isinstance(value, torch.dtype) or value is None or value == "auto":
        return value
    if isinstance(value, str) and value in MODEL_DTYPES:
        return getattr(torch, value)
    raise ValueError(
        f"model_init_kwargs['dtype']={value!r} is not a dtype: use one of {MODEL_DTYPES} or a torch.dtype (as TRL; "
        "'auto' keeps the checkpoint's dtype, and float32 is the default when dtype is not set)."
    )


def check_model_settings(args) -> None:
    """A `dtype` in `model_init_kwargs` that TRL does not accept is an error naming the field, before anything loads
    (run by `settings.check_settings`)."""
    if isinstance(args.model_init_kwargs, dict):
        model_dtype(args.model_init_kwargs)


def _resolve_dtype(model: str, kwargs: dict, on_cpu: bool) -> dict:
    """`from_pretrained` keywords with the dtype resolved by TRL's rule (`model_dtype`); on the CPU, `"auto"` is
    float32 when the checkpoint's half-precision dtype has no native kernels there (`cpu.cpu_dtype`)."""
    dtype = model_dtype(kwargs)
    if on_cpu:
        checkpoint_dtype = _checkpoint_dtype(model, kwargs) if dtype == "auto" else None
        dtype = model_dtype({"dtype": cpu.cpu_dtype(dtype, checkpoint_dtype)})
    return {**{key: value for key, value in kwargs.items() if key != "torch_dtype"}, "dtype": dtype}


def _checkpoint_dtype(model: str, kwargs: dict) -> str | None:
    """The `dtype` in the checkpoint's config.json when it is at hand (a local folder, the Hugging Face cache), else
    None. Only `"auto"` needs it; nothing is downloaded for it."""
    if gguf_source(model, kwargs) is not None:  # the dtype is inside the GGUF file
        return None
    try:
        config, _ = load_model_config(model)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def gguf_source(model: str, model_init_kwargs: dict | None = None) -> tuple[str, str] | None:
    """`(folder or repo id, file name)` when `model` names a GGUF checkpoint, else None.

    Either `model` is the path of a `.gguf` file, or `model_init_kwargs["gguf_file"]` names the file inside the folder
    or repo `model` (transformers' own spelling, `from_pretrained(folder, gguf_file=...)`).
    """
    if model.lower().endswith(".gguf"):
        folder, file = os.path.split(model)
        return folder or ".", file
    gguf_file = (model_init_kwargs or {}).get("gguf_file")
    return (model, gguf_file) if gguf_file else None


GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file


def _gguf_origin(model: str, model_init_kwargs: dict | None) -> str:
    """Where a GGUF path came from, in the trainer's terms (the CLI passes its own)."""
    if model.lower().endswith(".gguf"):
        return f"model={model!r}"
    return f"model={model!r} with model_init_kwargs['gguf_file']={(model_init_kwargs or {}).get('gguf_file')!r}"


def check_gguf_file(path: str, what: str, read_tensor_table: bool = False) -> None:
    """A local GGUF checkpoint is a file, not empty, starting with the `GGUF` magic; with `read_tensor_table`, its
    header and tensor table must fit in it too (read with the gguf package's `GGUFReader`, a few seconds for a
    tokenizer's vocabulary; loaders instead name the file when transformers' own reading fails,
    `named_gguf_errors`). Checked before transformers sees the path: for a missing file it reports Hub "repo id"
    errors, for a truncated one a numpy reshape error, neither naming the file. `what` says where the path came from
    (the trainer's argument or config field, the command line's argument); the errors name it and the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{what}: the GGUF file {path} does not exist (relative paths start from {os.getcwd()}). Check the path."
        )
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path} is not a file (a folder?); give the path of the .gguf file itself.")
    with open(path, "rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if not magic:
        raise ValueError(f"{what}: the GGUF file {path} is empty (0 bytes): download or copy it again.")
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{what}: {path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r} (a Git LFS pointer or "
            "an error page saved under that name?). Download the .gguf file itself."
        )
    if read_tensor_table:
        _require_gguf()
        from gguf import GGUFReader

        with named_gguf_errors(path, what):
            GGUFReader(path)


@contextmanager
def named_gguf_errors(path: str, what: str):
    """Reading a GGUF file that is cut short fails deep in numpy (a reshape, an index out of bounds): say which file
    and where it came from."""
    try:
        yield
    except (ValueError, IndexError) as error:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise ValueError(
            f"{what}: reading the GGUF file {path} ({size} bytes) failed ({type(error).__name__}: {error}). A "
            "truncated or corrupt file fails this way: download or copy it again."
        ) from error


def _check_local_gguf(model: str, source: tuple[str, str], what: str) -> None:
    """`check_gguf_file` on a GGUF source on this machine: a `.gguf` path always, a folder with `gguf_file` when it
    is a path rather than a Hub repository id (whose file only the Hub can check)."""
    folder, file = source
    if _is_local_gguf(model, folder):
        check_gguf_file(os.path.join(folder, file), what)


def _is_local_gguf(model: str, folder: str) -> bool:
    hub_id = not os.path.exists(folder) and folder.count("/") <= 1 and not folder.startswith((".", "/", "~"))
    return model.lower().endswith(".gguf") or not hub_id


def unwrap_distributed(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (a `PeftModel` stays a `PeftModel`). The one place wrappers are unwrapped."""
    return getattr(model, "module", model)


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside DDP / accelerate / PEFT wrappers (LoRA layers stay injected in it)."""
    model = unwrap_distributed(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


@contextmanager
def activation_checkpointing_off(model: nn.Module, checkpointing_kwargs: dict | None = None):
    """Activation (gradient) checkpointing off inside the block, back on after it with `checkpointing_kwargs`
    (`args.activation_checkpointing_kwargs`, split as transformers' Trainer splits them): no-grad passes and
    generation have nothing to recompute. TRL's `disable_gradient_checkpointing` does the same through the names
    transformers 5.24 deprecated, a FutureWarning at every call; this uses the current ones."""
    causal_lm = unwrap_causal_lm(model)
    was_on = getattr(causal_lm, "is_activation_checkpointing", False)
    if was_on:
        causal_lm.activation_checkpointing_disable()
    try:
        yield
    finally:
        if was_on:
            kwargs = dict(checkpointing_kwargs or {})
            every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
            causal_lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
            )


@contextmanager
def unwrapped_for_generation(model: nn.Module, accelerator, gather_deepspeed3_params=True, checkpointing_kwargs=None):
    """TRL's `unwrap_model_for_generation` (the model inside the DDP / DeepSpeed wrapper, activation checkpointing
    off, ZeRO-3 weights gathered unless `gather_deepspeed3_params=False`), through transformers' current names."""
    from trl.distributed import DistributedBackend

    unwrapped = accelerator.unwrap_model(model)
    with activation_checkpointing_off(unwrapped, checkpointing_kwargs):
        if not (DistributedBackend(accelerator).is_zero3 and gather_deepspeed3_params):
            yield unwrapped
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(model.parameters()):
            remove_hooks(model)
            try:
                yield unwrapped
            finally:
                add_hooks(model)


@contextmanager
def peft_checkpointing_read_ignored():
    """peft (0.21) reads the deprecated `is_gradient_checkpointing` when it wraps a model, a FutureWarning on
    transformers 5.24 the user can do nothing about; grpo-ext prepares the inputs for checkpointing itself
    (`apply_peft`), so that one warning is dropped, and only it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def uses_prompt_learning(model: nn.Module) -> bool:
    """Whether a PEFT prompt-learning adapter (prefix / prompt tuning) is on the model: it puts its own keys and values
    in the KV cache, so a cache built or cut by grpo-ext would not hold them."""
    peft_config = getattr(unwrap_distributed(model), "peft_config", None)
    if not isinstance(peft_config, dict):
        return False
    return any(getattr(config, "is_prompt_learning", False) for config in peft_config.values())


def load_causal_lm(
    model: str | nn.Module, model_init_kwargs: dict | None = None, on_cpu: bool | None = None
) -> nn.Module:
    """The policy: `model` itself when it is already a module, else `AutoModelForCausalLM.from_pretrained(model)`.

    `on_cpu` (default: no GPU in sight) says the model will run on the CPU, where `dtype="auto"` means float32 if the
    CPU has no native kernels for the checkpoint's bf16 / fp16 (`cpu.cpu_dtype`).

    A GGUF checkpoint (a `.gguf` path, or `gguf_file` in `model_init_kwargs`) is dequantised into a dense, trainable
    model (transformers' GGUF support, needs the `gguf` package: `pip install 'grpo-ext[gguf]'`).
    """
    if not isinstance(model, str):
        return model
    if on_cpu is None:
        on_cpu = not cpu.accelerator_available()
    kwargs = _resolve_dtype(model, model_init_kwargs or {}, on_cpu)
    source = gguf_source(model, kwargs)
    if source is None:
        auto_class = _auto_class(model, kwargs)
        kwargs = _vision_outside_quantization(model, auto_class, kwargs)
        return auto_class.from_pretrained(model, **kwargs)
    if kwargs.get("quantization_config") is not None:
        raise ValueError(
            f"{model} is a GGUF checkpoint, and transformers cannot quantize one with bitsandbytes as it loads. For "
            f"4-bit QLoRA convert it once to safetensors, `python -m grpo_ext.models {model} OUTPUT_DIR`, and pass "
            "OUTPUT_DIR as the model."
        )
    _require_gguf()
    _check_local_gguf(model, source, _gguf_origin(model, kwargs))
    from transformers import GgufConfig

    folder, file = source
    kwargs.update(gguf_file=file, quantization_config=GgufConfig(dequantize=True))  # packed GGUF blocks cannot train
    with named_gguf_errors(os.path.join(folder, file), _gguf_origin(model, kwargs)):
        loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return _as_dense(loaded, os.path.join(folder, file))


def _auto_class(model: str, kwargs: dict):
    """`AutoModelForImageTextToText` for a vision-language checkpoint that has no causal-LM class (Qwen2.5-VL, LLaVA),
    else `AutoModelForCausalLM`."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    options = {key: kwargs[key] for key in ("revision", "trust_remote_code") if key in kwargs}
    model_type = getattr(AutoConfig.from_pretrained(model, **options), "model_type", None)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def vision_module_names(model: nn.Module) -> list[str]:
    """The modules of a vision-language model that hold linear layers outside its language model and LM head: the
    vision tower and the projector (Qwen2.5-VL: `model.visual`, its merger inside; LLaVA: `model.vision_tower` and
    `model.multi_modal_projector`). The language model is transformers' `get_decoder()`, so no table of names per
    architecture is needed. `[]` for a text-only model."""
    if not is_vision_model(model):
        return []
    language_side = {id(model.get_decoder()), id(model.get_output_embeddings())}
    names = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in language_side:
                continue
            if any(id(inner) in language_side for inner in child.modules()):
                walk(child, f"{prefix}{name}.")  # holds the language model: look inside
            elif any(isinstance(inner, nn.Linear) for inner in child.modules()):
                names.append(f"{prefix}{name}")

    walk(model, "")
    return names


def _vision_outside_quantization(model: str, auto_class, kwargs: dict) -> dict:
    """`from_pretrained` keywords whose bitsandbytes config keeps a vision-language model's vision tower and projector
    out of quantization, in the loading dtype (16-bit on a GPU), as QLoRA quantizes the language model only: the
    vision side is small, its patch embeddings are sensitive to rounding, and it is not adapted (`lora_vision_tower`).
    The names come from the model built on the meta device (no weights); transformers' default skips (the LM head)
    are kept, since `llm_int8_skip_modules` replaces them. A config that sets `llm_int8_skip_modules` is the user's
    choice and is left as it is."""
    from transformers import AutoConfig, BitsAndBytesConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    quantization_config = kwargs.get("quantization_config")
    if not isinstance(quantization_config, BitsAndBytesConfig) or quantization_config.llm_int8_skip_modules:
        return kwargs
    options = {key: kwargs[key] for key in ("revision", "trust_remote_code") if key in kwargs}
    config = AutoConfig.from_pretrained(model, **options)
    if getattr(config, "vision_config", None) is None:
        return kwargs
    with torch.device("meta"):
        skeleton = auto_class.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    quantization_config = copy.deepcopy(quantization_config)
    quantization_config.llm_int8_skip_modules = vision_module_names(skeleton) + get_keys_to_not_convert(skeleton)
    return {**kwargs, "quantization_config": quantization_config}


def language_model_adapter(peft_config, model: nn.Module):
    """`peft_config` with a vision-language model's vision tower and projector (`vision_module_names`) added to its
    `exclude_modules`, so that LoRA adapts the language model only, whatever `target_modules` says (the vision MLPs of
    Qwen2.5-VL are named `gate_proj` / `up_proj` / `down_proj` too, and `"all-linear"` reaches every linear layer).
    The config itself is unchanged (a copy is returned); so is a config without `exclude_modules` (prompt learning)."""
    names = vision_module_names(model)
    if not names or not hasattr(peft_config, "exclude_modules"):
        return peft_config
    patterns = [rf"{re.escape(name)}(\..*)?" for name in names]  # the module and everything inside it
    excluded = peft_config.exclude_modules
    if isinstance(excluded, str):  # a regex, matched against the whole name
        patterns.append(f"(?:{excluded})")
    elif excluded:  # names, matched exactly or as a suffix
        patterns += [rf"(.*\.)?{re.escape(name)}" for name in excluded]
    peft_config = copy.copy(peft_config)
    peft_config.exclude_modules = "|".join(patterns)
    logger.info(
        "LoRA on the language model only: %s stay frozen (lora_vision_tower=True adapts them too).", ", ".join(names)
    )
    return peft_config


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError("Loading a .gguf checkpoint needs the gguf package: pip install 'grpo-ext[gguf]'") from error


def _as_dense(model: PreTrainedModel, gguf_path: str) -> PreTrainedModel:
    """A model dequantised from GGUF is plain dense weights, but transformers keeps its GGUF quantizer attached, so
    `save_pretrained` (checkpoints, merged models) refuses it as "not serializable". Detach it, and record the file
    as the model's path: the GGUF header's model name would otherwise stand there, and the tokenizer, the reference
    copy and the model card read that path."""
    model.hf_quantizer = None
    for config in (model.config, model.config.get_text_config()):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    model.config._name_or_path = gguf_path
    return model


def load_tokenizer(model: str | nn.Module, model_init_kwargs: dict | None = None):
    """The policy's tokenizer, read from the model's path (or `model` itself when it is a path, `.gguf` included, at
    `model_init_kwargs["revision"]` if given, with its `trust_remote_code`); left padding and truncation, as GRPO needs."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    vision = is_vision_model(model) if not isinstance(model, str) else None  # a path: read from its config below
    if not name:
        raise ValueError(
            "The model was built in memory and has no path to load a tokenizer from: pass processing_class=tokenizer."
            if not vision
            else f"{type(model).__name__} is a vision-language model built in memory, with no path to load its "
            "processor from: pass processing_class=AutoProcessor.from_pretrained(<model id>)."
        )
    kwargs = {"padding_side": "left", "truncation_side": "left"}
    for key in ("revision", "trust_remote_code"):  # the tokenizer comes from the same repository as the model
        if (model_init_kwargs or {}).get(key):
            kwargs[key] = model_init_kwargs[key]
    source = gguf_source(name, model_init_kwargs)
    if source is not None:
        _require_gguf()
        what = _gguf_origin(name, model_init_kwargs)
        _check_local_gguf(name, source, what)
        with named_gguf_errors(os.path.join(*source), what):
            return AutoTokenizer.from_pretrained(source[0], **kwargs, gguf_file=source[1])
    if vision is None:  # a model path: its config says whether it takes images; an adapter folder (no config) has
        # the processor's own file beside it when the trainer saved a processor
        config_kwargs = {key: kwargs[key] for key in ("revision", "trust_remote_code") if key in kwargs}
        try:
            vision = is_vision_model(types.SimpleNamespace(config=AutoConfig.from_pretrained(name, **config_kwargs)))
        except (OSError, ValueError):
            saved = ("processor_config.json", "preprocessor_config.json")  # transformers 5 / older layouts
            vision = any(os.path.isfile(os.path.join(name, file)) for file in saved)
    if vision:  # as TRL: a vision-language model's processor (its tokenizer inside)
        return AutoProcessor.from_pretrained(name, **kwargs)
    return AutoTokenizer.from_pretrained(name, **kwargs)


def save_dense_copy(gguf_path: str, output_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Dequantise a GGUF checkpoint once and save it, with its tokenizer, as a safetensors folder: it reloads in
    a second instead of being dequantised again, and loads in 4-bit (QLoRA), which a GGUF file cannot."""
    model = load_causal_lm(gguf_path, {"dtype": dtype})
    model.config._name_or_path = output_dir
    model.save_pretrained(output_dir)
    load_tokenizer(gguf_path).save_pretrained(output_dir)
    return output_dir


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


def apply_peft(
    model: PreTrainedModel, peft_config, gradient_checkpointing: bool, lora_vision_tower: bool = False
) -> nn.Module:
    """Wrap the model in a PEFT adapter; with gradient checkpointing the inputs must require grad for LoRA to learn.
    A vision-language model's vision tower and projector are left out of the adapter unless `lora_vision_tower`
    (`language_model_adapter`)."""
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
    if not lora_vision_tower:
        peft_config = language_model_adapter(peft_config, model)
    with peft_checkpointing_read_ignored():
        model = get_peft_model(model, peft_config)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _fp32_linear_forward(self: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """The LM head's projection in float32, outside autocast (`.float()` is free on the float32 weight; it keeps the
    projection in float32 if the model is cast again later)."""
    bias = None if self.bias is None else self.bias.float()
    with torch.autocast(hidden_states.device.type, enabled=False):
        return nn.functional.linear(hidden_states.float(), self.weight.float(), bias)


def _to_dtype_hook(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype)

    return hook


def cast_lm_head_to_fp32(model: nn.Module) -> nn.Module:
    """`cast_lm_head_to_fp32`, as TRL does it (ScaleRL, arXiv 2510.13786): the LM head's weight in float32 and its
    projection run in float32 outside autocast, for scoring and generation alike. With tied embeddings the shared
    weight becomes float32 and the input embeddings' output is cast back to the model's dtype. Idempotent; returns
    `model`. Raises, with TRL's message, when a PEFT adapter wraps the LM head."""
    causal_lm = unwrap_causal_lm(model)
    lm_head = causal_lm.get_output_embeddings()
    if getattr(lm_head, "_grpo_ext_fp32", False):
        return model
    if hasattr(lm_head, "base_layer"):  # a PEFT tuner layer (peft.tuners.tuners_utils.BaseTunerLayer)
        raise ValueError(
            "`cast_lm_head_to_fp32=True` is not supported when the lm_head carries a PEFT adapter (e.g. "
            "`target_modules` includes `lm_head`). Remove `lm_head` from the adapter's target modules, or set "
            "`cast_lm_head_to_fp32=False`."
        )
    original_dtype = lm_head.weight.dtype
    lm_head.float()
    lm_head.forward = types.MethodType(_fp32_linear_forward, lm_head)  # a bound method: deep copies rebind it
    lm_head._grpo_ext_fp32 = True
    if getattr(causal_lm.config.get_text_config(), "tie_word_embeddings", False) and original_dtype != torch.float32:
        causal_lm.get_input_embeddings().register_forward_hook(_to_dtype_hook(original_dtype))
    return model


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _warn_unused_loading_settings(model_init_kwargs: dict, quantization_config) -> None:
    """TRL's warnings (its wording, through a logger) when loading settings are given with a model already built.
    `trust_remote_code` alone is not warned about: the config copies it there for every loader."""
    if any(key != "trust_remote_code" for key in model_init_kwargs):
        logger.warning(
            "You passed `model_init_kwargs` to the `GRPOConfig`, but your model is already instantiated. The "
            "`model_init_kwargs` will be ignored. (Reward models given by path are still loaded with them.)"
        )
    if quantization_config is not None:
        logger.warning(
            "You passed `quantization_config` to the trainer, but your model is already instantiated. The "
            "`quantization_config` will be ignored. Pass the model's id or path to load it quantized."
        )


def prepare_policy(model, args, processing_class=None, peft_config=None, quantization_config=None):
    """The trainer's policy and tokenizer, in this order: load (`model_init_kwargs`, plus `quantization_config`),
    keep 4-bit weights trainable, fit the micro-batch to `gpu_memory_budget` if set (`plan.fit_batch_size`), tokenizer
    (unless given; pad token = EOS when it has none), adapter, dropout off with `disable_dropout`, the LM head in
    float32 with `cast_lm_head_to_fp32`. Returns `(model, processing_class, fitted_batch)` (the tokenizer, or a
    vision-language model's processor): `fitted_batch` is the micro-batch
    `gpu_memory_budget` fits (a `plan.FittedBatch`; None without a budget), which the caller applies with
    `GRPOExtConfig.resize_micro_batch`; `args` is read, never changed."""
    model_init_kwargs = dict(args.model_init_kwargs or {})
    if not isinstance(model, str):
        _warn_unused_loading_settings(model_init_kwargs, quantization_config)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    model = keep_4bit_weights_trainable(load_causal_lm(model, model_init_kwargs, cpu.trains_on_cpu(args)))
    fitted_batch = None
    if args.gpu_memory_budget is not None:  # the largest micro-batch the memory planner predicts to fit
        fitted_batch = fit_batch_size(args, model.config, peft_config, getattr(model, "is_loaded_in_4bit", False))
    if processing_class is None:
        processing_class = load_tokenizer(model, model_init_kwargs)
    tokenizer = tokenizer_of(processing_class)  # a vision-language model's processor holds its tokenizer
    declared = model.generation_config.eos_token_id
    declared = [declared] if isinstance(declared, int) else list(declared or [])
    if tokenizer.eos_token_id is None and not declared:
        raise ValueError(
            "Neither the tokenizer (processing_class) has an eos_token nor the model's generation_config an "
            "eos_token_id: a completion would have no stop token, so none could end before max_completion_length "
            "and GRPO's masks (each completion up to its first stop token) would be wrong. Set one, e.g. "
            "tokenizer.eos_token = '<|endoftext|>' (a token of its vocabulary) or "
            "model.generation_config.eos_token_id = <id>, before building the trainer."
        )
    if tokenizer.pad_token is None:  # padding is masked: any token does, the first stop token as in TRL
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(declared[0])
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # a vision-language model's text config
    if peft_config is not None:
        model = apply_peft(model, peft_config, args.activation_checkpointing, args.lora_vision_tower)
    elif hasattr(model, "peft_config") and args.activation_checkpointing:
        model.enable_input_require_grads()
    if args.disable_dropout:
        disable_dropout(model)
    if args.cast_lm_head_to_fp32:
        cast_lm_head_to_fp32(model)
    return model, processing_class, fitted_batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_ext.models", description="Convert a GGUF checkpoint to a dense safetensors folder."
    )
    parser.add_argument("gguf_path", help="the .gguf file")
    parser.add_argument("output_dir")
    cli = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpo_ext").setLevel(logging.INFO)
    cpu.set_torch_threads()  # dequantising runs on the CPU
    try:
        check_gguf_file(cli.gguf_path, f"GGUF_PATH {cli.gguf_path}", read_tensor_table=True)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(f"saved {save_dense_copy(cli.gguf_path, cli.output_dir)}")  # noqa: T201 - the command line's output


if __name__ == "__main__":
    main()
