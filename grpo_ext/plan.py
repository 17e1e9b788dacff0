"""Will it fit? The peak accelerator memory of one GRPO optimizer step, predicted from the model's config alone.

    python -m grpo_ext.plan --config recipes/configs/qwen2.5-math-1.5b-gsm8k-8gb.yaml --gpu-memory 8GiB

The step is the one `GRPOExtTrainer` runs (docs/architecture.md, section 2), and its peak is the largest of four
phases, each on top of the memory held all along (weights, LoRA, optimizer states, reference, reward models):

- **generation**: the KV cache of the whole rollout (`generation_batch_size` completions on this device, prompt and
  completion), the prefill of the prompts (each unique prompt once with prefix sharing) and the sampling logits;
- **scoring**: the no-grad old / reference log-prob pass over the whole rollout, one layer and one LM-head chunk at a
  time (with prefix sharing the prompts' keys / values of every layer are kept for the completion pass);
- **training**: the forward and backward of one micro-batch (`per_device_train_batch_size` completions): the
  activations kept for the backward (every layer's, or only each layer's input under gradient checkpointing, plus one
  layer recomputed), the chunked LM head, and the LoRA gradients;
- **optimizer**: LoRA gradients and AdamW's two fp32 moments.

A vision-language model (the families of `VISION_FAMILIES`: Qwen2.5-VL, Qwen2-VL, Gemma 3) adds its vision tower and
projector (16-bit and frozen by default: out of NF4 and LoRA), its images' tokens to each prompt (`P` = text + image
tokens, counted from `image_size` as the model's image processor resizes), and the vision encoder's forward without
gradient over the images before the prefill, the scoring pass and each micro-batch (each prompt's images once per group
with prefix sharing, else G times). The vision layers are counted as the language model's are; no measured peak of a
vision-language step checks them yet.

Nothing is loaded but `config.json`: from `--model-config`, a local model folder, the local Hugging Face cache, or
the configs shipped in `grpo_ext/model_configs/` for the models the recipes name. The activation coefficients come
from counting the tensors autograd keeps in a Qwen2 / Llama decoder layer with LoRA on every linear layer, and are
checked against measured CPU peaks in `benchmarks/plan_check.py` (table in benchmarks/README.md). On a GPU a stated
allowance is added for the CUDA context and the caching allocator (`CUDA_CONTEXT_BYTES`, `ALLOCATOR_SLACK`).

Shapes below: `b` completions per micro-batch, `N` completions per rollout on this device, `G` completions per prompt,
`P` prompt tokens, `C` completion tokens, `H` hidden size, `I` MLP size, `L` layers, `V` vocabulary, `r` LoRA rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .cpu import auto_is_float32

GiB = 2**30
MiB = 2**20
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # CUDA context + cuBLAS / kernels, as torch reports it on consumer cards
ALLOCATOR_SLACK = 0.10  # PyTorch's caching allocator: blocks reserved but not in use at the peak
DEFAULT_PROMPT_LENGTH = 256  # tokens, when the config has no max_prompt_length (a GSM8K prompt with its chat template)
NF4_BLOCK = 64  # bitsandbytes: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantisation: the absmaxes quantised to 8 bits in blocks of 256
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODEL_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2, None: 2}
_NEEDED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# model_type of the language models with biases on q, k, v (Qwen2 and the Qwen vision-language models built on it)
QKV_BIAS_MODEL_TYPES = {"qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"}


# --- Inputs: the model's shape and the step's settings ---

# model_type -> the recurrent layers it mixes in, for configs whose config.json does not list them in `layer_types`
RECURRENT_MODEL_TYPES = {
    "mamba": "Mamba",
    "falcon_mamba": "Mamba",
    "jamba": "Mamba",
    "zamba": "Mamba",
    "mamba2": "Mamba-2",
    "nemotron_h": "Mamba-2",
    "falcon_h1": "Mamba-2",
    "granitemoehybrid": "Mamba-2",
    "bamba": "Mamba-2",
    "zamba2": "Mamba-2",
    "qwen3_next": "Gated DeltaNet linear-attention",
    "qwen3_5_text": "Gated DeltaNet linear-attention",
    "qwen3_5_moe_text": "Gated DeltaNet linear-attention",
    "olmo_hybrid": "Gated DeltaNet linear-attention",
    "kimi_linear": "Kimi Delta Attention linear-attention",
    "minimax": "lightning-attention",
    "lfm2": "short-convolution",
    "lfm2_moe": "short-convolution",
    "recurrent_gemma": "RG-LRU",
    "rwkv": "RWKV",
    "xlstm": "xLSTM",
}
# Values of a config's `layer_types` (and NemotronH's `layers_block_type`) that name a layer with a recurrent state
_RECURRENT_LAYER_TYPES = {"linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding"}


def _recurrent_layers(config: Mapping) -> str | None:
    """What recurrent layers a model config has (e.g. "Mamba-2"), or None for a transformer of attention layers."""
    listed = set(config.get("layer_types") or []) | set(config.get("layers_block_type") or [])
    named = sorted(listed & _RECURRENT_LAYER_TYPES)
    return RECURRENT_MODEL_TYPES.get(config.get("model_type")) or (" / ".join(named) if named else None)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer's `config.json` that decide its memory."""

    hidden_size: int  # H
    intermediate_size: int  # I
    num_layers: int  # L
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # V
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q, k, v
    vision: VisionShape | None = None  # a vision-language model's vision tower and projector

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """`name: (in, out)` of the linear layers of one decoder layer."""
        H, I = self.hidden_size, self.intermediate_size  # noqa: E741
        return {
            "q_proj": (H, self.q_dim),
            "k_proj": (H, self.kv_dim),
            "v_proj": (H, self.kv_dim),
            "o_proj": (self.q_dim, H),
            "gate_proj": (H, I),
            "up_proj": (H, I),
            "down_proj": (I, H),
        }

    @classmethod
    def from_config(
        cls,
        config: Mapping,
        source: str = "the model config",
        fix: str = "Pass the model's own config.json with --model-config (or plan_step(model_config=...)).",
    ) -> ModelShape:
        """The shape of `config`; `fix` ends the error when a number the planner needs is missing (the command line
        and the trainer say it in their own terms)."""
        outer = config
        config = dict(config.get("text_config") or config)  # multimodal configs nest the language model's
        recurrent = _recurrent_layers(config)
        if recurrent:
            raise ValueError(
                f"{source}: the memory planner cannot plan model_type {config.get('model_type')!r}: its {recurrent} "
                "layers keep one recurrent state per sequence instead of a KV cache that grows with each token, and "
                "their weights are not a transformer layer's q/k/v/o + MLP. It plans decoder-only transformers whose "
                f"layers are all attention layers. {fix}"
            )
        missing = [name for name in _NEEDED_FIELDS if config.get(name) is None]
        if missing:
            raise ValueError(
                f"{source} has no {', '.join(missing)}: the memory planner needs {', '.join(_NEEDED_FIELDS)} of a "
                f"decoder-only transformer. {fix}"
            )
        vision = None
        if outer.get("vision_config") is not None:
            vision = _vision_shape(outer, source, fix)
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            # transformers 5 keeps a vision-language model's flag at the top, older configs in text_config
            tied_embeddings=bool(outer.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
            qkv_bias=config.get("model_type") in QKV_BIAS_MODEL_TYPES or bool(config.get("attention_bias", False)),
            vision=vision,
        )


# --- The vision tower of a vision-language model ---

# Qwen2.5-VL's preprocessor_config.json: images are resized to multiples of patch x merge pixels within these bounds
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12845056
DEFAULT_IMAGE_SIZE = (448, 448)  # (height, width): 16 x 16 = 256 image tokens on Qwen2-VL / Qwen2.5-VL


@dataclass(frozen=True)
class VisionShape:
    """The vision tower and its projector into the language model, from a vision-language config's `vision_config`.

    The tower is a ViT over an image's patches (`p x p` pixels, `temporal_patch_size` frames: Qwen repeats an image
    to 2), each layer norm -> attention -> norm -> MLP with biases on every linear layer; the projector turns every
    `m x m` patches into one image token of the language model's width (Qwen's merger MLP, Gemma 3's average pooling
    and one matrix). Shapes: `Hv` hidden size, `Iv` MLP size, `Lv` layers, `m` merge size.
    """

    family: str  # the config's model_type, a key of VISION_FAMILIES
    hidden_size: int  # Hv
    intermediate_size: int  # Iv
    num_layers: int  # Lv
    num_heads: int
    patch_size: int  # p
    temporal_patch_size: int
    in_channels: int
    merge_size: int  # m: m x m patches -> one image token
    out_hidden_size: int  # the language model's H
    gated_mlp: bool  # gate_proj / up_proj / down_proj (Qwen2.5-VL), else fc1 / fc2
    layer_norm: bool  # LayerNorm (weight and bias), else RMSNorm (weight)
    patch_bias: bool  # the patch embedding's convolution has a bias (SigLIP)
    position_embeddings: int  # learned positions, one per patch (SigLIP); 0 with rotary positions (Qwen)
    post_norm: bool  # a norm after the last layer (SigLIP)
    projector_linear: tuple[tuple[int, int, bool], ...]  # (in, out, bias) of the projector's matrices
    projector_norm: int  # weights of the projector's norm (bias included)
    fixed_image_size: int | None = None  # every image resized to this square (SigLIP in Gemma 3); None: Qwen's rule

    # The interface of ModelShape that _layer_activation_bytes reads: attention of Hv-wide queries, keys and values
    @property
    def q_dim(self) -> int:
        return self.hidden_size

    @property
    def kv_dim(self) -> int:
        return self.hidden_size

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """`name: (in, out)` of the linear layers of one vision layer (q, k, v fused as Qwen's `qkv`)."""
        Hv, Iv = self.hidden_size, self.intermediate_size
        attention = {"qkv": (Hv, 3 * Hv), "proj": (Hv, Hv)}
        if self.gated_mlp:
            return {**attention, "gate_proj": (Hv, Iv), "up_proj": (Hv, Iv), "down_proj": (Iv, Hv)}
        return {**attention, "fc1": (Hv, Iv), "fc2": (Iv, Hv)}

    def parameters(self) -> dict[str, int]:
        """Parameter counts of the patch embedding, the layers and the projector (as `model.visual` /
        `model.vision_tower` + `model.multi_modal_projector` hold them)."""
        Hv, p = self.hidden_size, self.patch_size
        norm = 2 * Hv if self.layer_norm else Hv
        patch_values = self.in_channels * self.temporal_patch_size * p * p
        layer = sum(i * o + o for i, o in self.linear_layers().values()) + 2 * norm  # every linear layer has a bias
        return {
            "patch embedding": patch_values * Hv + (Hv if self.patch_bias else 0) + self.position_embeddings * Hv,
            "layers": self.num_layers * layer + (norm if self.post_norm else 0),
            "projector": sum(i * o + (o if bias else 0) for i, o, bias in self.projector_linear) + self.projector_norm,
        }

    def image_grid(self, height: int, width: int) -> tuple[int, int]:
        """(patches the tower encodes, image tokens the language model sees) of one image of `height x width`
        pixels, resized as the model's image processor does."""
        if self.fixed_image_size:
            height = width = self.fixed_image_size
        else:
            height, width = qwen_smart_resize(height, width, self.patch_size * self.merge_size)
        patches = (height // self.patch_size) * (width // self.patch_size)
        return patches, patches // self.merge_size**2


def qwen_smart_resize(height: int, width: int, factor: int) -> tuple[int, int]:
    """Qwen2-VL's `smart_resize` (transformers' image_processing_qwen2_vl): each side rounded to a multiple of
    `factor` (patch x merge = 28), the area kept within QWEN_MIN_PIXELS and QWEN_MAX_PIXELS, the aspect ratio kept."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > QWEN_MAX_PIXELS:
        beta = math.sqrt(height * width / QWEN_MAX_PIXELS)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < QWEN_MIN_PIXELS:
        beta = math.sqrt(QWEN_MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _qwen2_5_vl_vision(config: Mapping, vision: Mapping) -> VisionShape:
    """Qwen2.5-VL: RMSNorm, a gated MLP (gate/up/down with biases), the merger MLP (RMSNorm, Hv m^2 -> Hv m^2 -> H)."""
    Hv, m = vision["hidden_size"], vision.get("spatial_merge_size", 2)
    return VisionShape(
        family="qwen2_5_vl",
        hidden_size=Hv,
        intermediate_size=vision["intermediate_size"],
        num_layers=vision["depth"],
        num_heads=vision["num_heads"],
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        in_channels=vision.get("in_channels") or vision.get("in_chans") or 3,
        merge_size=m,
        out_hidden_size=vision["out_hidden_size"],
        gated_mlp=True,
        layer_norm=False,
        patch_bias=False,
        position_embeddings=0,
        post_norm=False,
        projector_linear=((Hv * m * m, Hv * m * m, True), (Hv * m * m, vision["out_hidden_size"], True)),
        projector_norm=Hv,
    )


def _qwen2_vl_vision(config: Mapping, vision: Mapping) -> VisionShape:
    """Qwen2-VL: LayerNorm, an fc1/fc2 MLP of `mlp_ratio x embed_dim`, the merger (LayerNorm, Hv m^2 -> Hv m^2 -> H);
    its vision config calls the tower's width `embed_dim` and the language model's `hidden_size`."""
    Hv, m, H = vision["embed_dim"], vision.get("spatial_merge_size", 2), vision["hidden_size"]
    return VisionShape(
        family="qwen2_vl",
        hidden_size=Hv,
        intermediate_size=int(Hv * vision.get("mlp_ratio", 4)),
        num_layers=vision["depth"],
        num_heads=vision["num_heads"],
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        in_channels=vision.get("in_channels") or vision.get("in_chans") or 3,
        merge_size=m,
        out_hidden_size=H,
        gated_mlp=False,
        layer_norm=True,
        patch_bias=False,
        position_embeddings=0,
        post_norm=False,
        projector_linear=((Hv * m * m, Hv * m * m, True), (Hv * m * m, H, True)),
        projector_norm=2 * Hv,
    )


def _gemma3_vision(config: Mapping, vision: Mapping) -> VisionShape:
    """Gemma 3: a SigLIP tower (LayerNorm, fc1/fc2, learned positions, no pooling head) on images resized to
    `image_size` squared; the projector average-pools its patches to `mm_tokens_per_image` tokens, RMS-norms them and
    multiplies by one `(Hv, H)` matrix."""
    Hv, p, size = vision["hidden_size"], vision.get("patch_size", 14), vision.get("image_size", 896)
    tokens_per_side = math.isqrt(config.get("mm_tokens_per_image") or 256)
    H = (config.get("text_config") or config)["hidden_size"]
    return VisionShape(
        family="gemma3",
        hidden_size=Hv,
        intermediate_size=vision["intermediate_size"],
        num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        patch_size=p,
        temporal_patch_size=1,
        in_channels=vision.get("num_channels", 3),
        merge_size=size // p // tokens_per_side,
        out_hidden_size=H,
        gated_mlp=False,
        layer_norm=True,
        patch_bias=True,
        position_embeddings=(size // p) ** 2,
        post_norm=True,
        projector_linear=((Hv, H, False),),
        projector_norm=Hv,
        fixed_image_size=size,
    )


# model_type of a vision-language config -> how its vision_config reads; a family is one entry and one test
VISION_FAMILIES = {
    "qwen2_5_vl": _qwen2_5_vl_vision,
    "qwen2_vl": _qwen2_vl_vision,
    "gemma3": _gemma3_vision,
}


def _vision_shape(config: Mapping, source: str, fix: str) -> VisionShape:
    family = VISION_FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ValueError(
            f"{source}: the memory planner cannot plan the vision tower of model_type {config.get('model_type')!r}: "
            f"it reads the vision configs of {', '.join(sorted(VISION_FAMILIES))} (a family is one entry of "
            f"grpo_ext.plan.VISION_FAMILIES). {fix}"
        )
    try:
        return family(config, config["vision_config"])
    except KeyError as missing:
        raise ValueError(
            f"{source}: its vision_config has no {missing}, which the memory planner needs. {fix}"
        ) from None


@dataclass(frozen=True)
class StepSettings:
    """What a GRPO step does, from the training config (field names as in GRPOExtConfig and TRL's ModelConfig)."""

    per_device_train_batch_size: int = 8  # b
    generation_batch_size: int = 8  # N: completions per rollout on this device
    num_generations: int = 8  # G
    prompt_length: int = DEFAULT_PROMPT_LENGTH  # P
    max_completion_length: int = 512  # C
    gradient_checkpointing: bool = False
    prefix_sharing: bool = True
    logprob_chunk_size: int = 1024
    load_in_4bit: bool = False
    double_quant: bool = True
    dtype_bytes: int = 2  # the 16-bit layers and the activations (4 for float32)
    lora_r: int | None = 16  # None: full fine-tuning
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dropout: bool = False  # dropout > 0 keeps a dropped copy of each adapter's input
    reference: str = "disabled_adapter"  # none | disabled_adapter | snapshot_adapter | copy
    reward_model_shapes: tuple[ModelShape, ...] = ()
    device: str = "cuda"  # "cpu": no CUDA context, no allocator slack
    # A vision-language model's images (ignored for a text model); prompt_length counts the prompt's text tokens
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE  # (height, width) of each image given to the processor
    images_per_prompt: int = 1
    image_tokens_per_image: int | None = None  # instead of the count from image_size (other processor settings)
    images_once_per_group: bool = True  # with prefix sharing each prompt's images are encoded once per group, not G
    vision_load_in_4bit: bool = False  # under load_in_4bit, the vision layers' linear weights in NF4 too
    vision_trains: bool = False  # LoRA on the vision layers (full fine-tuning: its weights); else frozen

    def replace(self, **changes) -> StepSettings:
        return dataclasses.replace(self, **changes)


# --- The prediction ---


@dataclass
class MemoryPlan:
    """Bytes of each component, the phase each one belongs to, and the predicted peak."""

    components: dict[str, int]
    phases: dict[str, int]  # phase -> bytes on top of the resident ones
    resident: int  # held all along
    peak: int
    peak_phase: str
    settings: StepSettings
    notes: list[str] = field(default_factory=list)

    def table(self, budget: int | None = None) -> str:
        width = max(len(name) for name in self.components)
        lines = [f"{'component':<{width}}  {'GiB':>7}"]
        lines += [f"{name:<{width}}  {size / GiB:7.3f}" for name, size in self.components.items()]
        lines.append(f"{'peak (' + self.peak_phase + ' phase)':<{width}}  {self.peak / GiB:7.3f}")
        lines += [f"  {note}" for note in self.notes]
        if budget is not None:
            lines.append(verdict(self.peak, budget))
        return "\n".join(lines)


def verdict(peak: int, budget: int) -> str:
    if peak <= budget:
        return f"fits {format_bytes(budget)} with {format_bytes(budget - peak)} to spare"
    return f"does not fit {format_bytes(budget)}: {format_bytes(peak - budget)} over"


def format_bytes(size: int) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB / 10 else f"{size / MiB:.1f} MiB"


MEMORY_UNITS = {"b": 1, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of a memory size with its unit: `8GiB`, `8 GiB`, `24GB` (GB read as GiB: what GPU makers mean),
    `512MiB`, `1e9B`. A number without a unit (`24`: bytes or GiB?) and a size that is not positive are refused:
    the message says what to write, the caller names the field or flag."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a memory size: write e.g. '8GiB', '24GB' or '512MiB'.")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if not unit:
        raise ValueError(
            f"{text!r} has no unit: write e.g. '{match.group(1)}GiB' (or GB, MiB, B for bytes), so that a size in "
            "GiB is not read as bytes."
        )
    size = int(number * MEMORY_UNITS[unit[:1]])
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive memory size: give the GPU's memory, e.g. '24GiB'.")
    return size


def check_memory_settings(args) -> None:
    """`gpu_memory_budget` of a config is a memory size `parse_memory` reads (run by `settings.check_settings`)."""
    if args.gpu_memory_budget is None:
        return
    try:
        parse_memory(args.gpu_memory_budget)
    except ValueError as error:
        raise ValueError(f"gpu_memory_budget={args.gpu_memory_budget!r}: {error}") from None


def _nf4_bytes(weights: int, double_quant: bool) -> int:
    """`weights` NF4 weights (half a byte each) and their absmaxes: 1 byte per block of 64 with double quantisation
    (+ an fp32 absmax per 256 blocks), else fp32 per block."""
    blocks = weights // NF4_BLOCK
    constants = blocks + 4 * (blocks // NESTED_BLOCK) if double_quant else 4 * blocks
    return weights // 2 + constants


def base_weight_bytes(shape: ModelShape, settings: StepSettings) -> dict[str, int]:
    """The language model as loaded: NF4 linear layers with their quantisation constants, the rest in 16 (or 32)
    bits. A vision-language model's vision tower: `vision_weight_bytes`."""
    s = settings.dtype_bytes
    linear = sum(i * o for i, o in shape.linear_layers().values()) * shape.num_layers
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)  # embed_tokens, lm_head
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    biases = (shape.q_dim + 2 * shape.kv_dim) * shape.num_layers if shape.qkv_bias else 0
    if not settings.load_in_4bit:
        return {"base weights": (linear + embeddings + norms + biases) * s}
    return {
        "base weights: NF4 linear layers": _nf4_bytes(linear, settings.double_quant),
        "base weights: 16-bit embeddings, lm_head, norms": (embeddings + norms + biases) * s,
    }


def vision_weight_bytes(vision: VisionShape, settings: StepSettings) -> dict[str, int]:
    """The vision tower and projector as loaded: in 16 (or 32) bits, the default (bitsandbytes told to skip them), or
    with `vision_load_in_4bit` its layers' linear weights NF4 (the patch embedding, norms, biases and projector not)."""
    total = sum(vision.parameters().values())
    if not (settings.load_in_4bit and settings.vision_load_in_4bit):
        return {"vision tower + projector (16-bit)": total * settings.dtype_bytes}
    linear = sum(i * o for i, o in vision.linear_layers().values()) * vision.num_layers
    return {
        "vision tower: NF4 linear layers": _nf4_bytes(linear, settings.double_quant),
        "vision tower + projector: 16-bit rest": (total - linear) * settings.dtype_bytes,
    }


def lora_parameters(shape: ModelShape, settings: StepSettings) -> int:
    """LoRA's `r (in + out)` per adapted linear layer: the language model's `lora_targets`, and every linear layer of
    the vision layers when the vision tower trains."""
    layers = shape.linear_layers()
    n = sum(settings.lora_r * (i + o) for name, (i, o) in layers.items() if name in settings.lora_targets)
    n *= shape.num_layers
    if shape.vision is not None and settings.vision_trains:
        n += sum(settings.lora_r * (i + o) for i, o in shape.vision.linear_layers().values()) * shape.vision.num_layers
    return n


def _trainable_bytes(shape: ModelShape, settings: StepSettings, base: int) -> tuple[int, int, int]:
    """(weights, gradients, AdamW moments) of what is trained. LoRA weights stay fp32 on a 4-bit or 16-bit base.
    `base`: the bytes of the weights full fine-tuning trains (a frozen vision tower's left out)."""
    if settings.lora_r is None:  # full fine-tuning: gradients in the weights' dtype, moments too
        return 0, base, 2 * base
    n = lora_parameters(shape, settings)
    return 4 * n, 4 * n, 8 * n


def image_grid(shape: ModelShape, settings: StepSettings) -> tuple[int, int]:
    """(patches the vision tower encodes, image tokens the language model sees) per image; (0, 0) for a text model."""
    if shape.vision is None:
        return 0, 0
    if settings.image_tokens_per_image is not None:
        return settings.image_tokens_per_image * shape.vision.merge_size**2, settings.image_tokens_per_image
    return shape.vision.image_grid(*settings.image_size)


def _vision_encoder_bytes(vision: VisionShape, settings: StepSettings, images: int, grid: tuple[int, int]) -> int:
    """The vision tower's forward over `images` images at once, without keeping anything for a backward: their pixel
    values `(images x patches, C x t x p^2)` in fp32 as the processor gives them and the copy the patch embedding
    casts, one layer's working set over all the patches (the language model's no-grad count: 5Hv + 3Iv per patch),
    and the projector's merged rows `(images x tokens, m^2 Hv)` twice and its output `(images x tokens, H)`."""
    s, (patches, tokens) = settings.dtype_bytes, grid
    pixels = images * patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * (4 + s)
    layer = images * patches * (5 * vision.hidden_size + 3 * vision.intermediate_size) * s
    projector = images * tokens * (2 * vision.merge_size**2 * vision.hidden_size + vision.out_hidden_size) * s
    return pixels + layer + projector


def _vision_training_bytes(vision: VisionShape, settings: StepSettings, images: int, grid: tuple[int, int]) -> int:
    """The vision tower in a training forward and backward. Frozen, autograd keeps nothing (no parameter and no input
    needs a gradient): its no-grad working set, for a moment. Trained, every vision layer's activations over the
    patches (or only each layer's input under gradient checkpointing, plus one layer recomputed) on top of it."""
    working_set = _vision_encoder_bytes(vision, settings, images, grid)
    if not settings.vision_trains:
        return working_set
    patches = images * grid[0]
    all_linear = settings.replace(lora_targets=tuple(vision.linear_layers()))  # LoRA on every vision linear layer
    one_layer = _layer_activation_bytes(vision, all_linear, patches, patches)
    if settings.gradient_checkpointing:
        return working_set + vision.num_layers * patches * vision.hidden_size * settings.dtype_bytes + one_layer
    return working_set + vision.num_layers * one_layer


def _layer_activation_bytes(shape: ModelShape | VisionShape, settings: StepSettings, tokens: int, keys: int) -> int:
    """Activations one decoder layer keeps for its backward: `tokens` rows of queries, `keys` rows of keys/values.

    Per token: the layer input and the attention input (both normed copies: 4H with the residual), q and the attention
    output (2 q_dim), the o_proj input (H), the MLP's gate, SiLU(gate), up and their product (4I), each adapter's
    rank-r hidden (7r), a dropped copy of each adapter's input with LoRA dropout. Keys and values (2 kv_dim) per key
    row: with prefix sharing, the completion pass attends over the group's prompt keys too.
    """
    H, I = shape.hidden_size, shape.intermediate_size  # noqa: E741
    per_token = 5 * H + 2 * shape.q_dim + 4 * I
    if settings.lora_r is not None:
        targets = [io for name, io in shape.linear_layers().items() if name in settings.lora_targets]
        per_token += settings.lora_r * len(targets)
        if settings.lora_dropout:
            per_token += sum(i for i, _ in targets)
    return settings.dtype_bytes * (tokens * per_token + keys * 2 * shape.kv_dim)


def _lm_head_chunk_bytes(shape: ModelShape, settings: StepSettings, rows: int, training: bool) -> int:
    """The chunked LM head: `n = min(chunk, scored tokens)` logits `(n, V)` in the compute dtype, their fp32 copy,
    the scaled copy and the softmax; the backward of the recomputed chunk adds the gradient of the logits."""
    n = min(settings.logprob_chunk_size, rows * settings.max_completion_length)
    per_logit = settings.dtype_bytes + 4 * (4 if training else 3)
    return n * shape.vocab_size * per_logit


def plan_step(shape: ModelShape, settings: StepSettings) -> MemoryPlan:
    """Predict the peak memory of one optimizer step, component by component.

    A vision-language model's prompt is its text and its images' tokens, `P = prompt_length + images_per_prompt x
    image tokens`, in the KV cache, the prefill, scoring and training like any prompt token; its vision tower encodes
    the images (`images_once_per_group` with prefix sharing: each group's once, else each completion's) before the
    prefill, the scoring pass and each micro-batch's forward."""
    s, L, H = settings.dtype_bytes, shape.num_layers, shape.hidden_size
    C, G = settings.max_completion_length, settings.num_generations
    b, N = settings.per_device_train_batch_size, settings.generation_batch_size
    sharing = settings.prefix_sharing and G > 1
    grid = image_grid(shape, settings)  # (patches, image tokens) per image
    P = settings.prompt_length + settings.images_per_prompt * grid[1]
    components = base_weight_bytes(shape, settings)
    trained_base = sum(components.values())
    if shape.vision is not None:
        vision_weights = vision_weight_bytes(shape.vision, settings)
        components.update(vision_weights)
        if settings.vision_trains:
            trained_base += sum(vision_weights.values())
    base = sum(components.values())
    lora_weights, gradients, moments = _trainable_bytes(shape, settings, trained_base)
    if settings.lora_r is not None:
        components["LoRA weights (fp32)"] = lora_weights
    reference = {
        "none": 0,
        "disabled_adapter": 0,
        "snapshot_adapter": lora_weights,
        "copy": base,
    }[settings.reference]
    components[f"reference ({settings.reference})"] = reference
    rewards = sum(
        sum(base_weight_bytes(r, settings.replace(load_in_4bit=False)).values()) for r in settings.reward_model_shapes
    )
    if settings.reward_model_shapes:
        components["reward models"] = rewards
    components["AdamW moments (fp32)"] = moments
    resident = sum(components.values())

    # The 4-bit matmuls dequantise one weight at a time: the largest, in the compute dtype, exists for a moment
    dequantised = max(i * o for i, o in shape.linear_layers().values()) * s if settings.load_in_4bit else 0
    # A no-grad forward holds, per token, the residual stream and its normed copies (5H) and three MLP-wide tensors
    # at once (gate or SiLU(gate), up, their product: 3I); the prefill of `generate` one more (4I)
    no_grad_per_token = (3 * shape.intermediate_size + 5 * H) * s

    # Generation: KV cache of N rows of P + C tokens, the prefill's largest layer, the sampling logits (N, V) fp32
    kv_cache = 2 * L * shape.kv_dim * N * (P + C) * s
    prefill_rows = N // G if sharing else N
    prefill = prefill_rows * P * (no_grad_per_token + shape.intermediate_size * s) + dequantised
    sampling = N * shape.vocab_size * (s + 3 * 4)
    generation = {"generation: KV cache": kv_cache, "generation: prefill + sampling logits": prefill + sampling}

    # Scoring (no grad) over the whole rollout: one layer at a time, the shared prompt keys, one LM-head chunk
    rows_tokens = N * C + (N // G) * P if sharing else N * (P + C)
    shared_keys = 2 * L * shape.kv_dim * (N // G) * P * s if sharing else 0
    scoring = {
        "scoring (no grad): one layer + hidden states": rows_tokens * no_grad_per_token + dequantised + shared_keys,
        "scoring (no grad): LM-head chunk": _lm_head_chunk_bytes(shape, settings, N, training=False),
    }

    # Training: one micro-batch of b completions
    prompts_in_batch = max(1, b // G) if sharing else b
    tokens = prompts_in_batch * P + b * C if sharing else b * (P + C)
    keys = prompts_in_batch * P + b * (P + C) if sharing else b * (P + C)
    one_layer = _layer_activation_bytes(shape, settings, tokens, keys)
    if settings.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        activations = L * tokens * H * s + one_layer
    else:
        activations = L * one_layer
    activations += tokens * 2 * shape.intermediate_size * s  # the backward of one layer: gradients of its MLP
    training = {
        f"training: activations ({'checkpointed' if settings.gradient_checkpointing else 'all layers'})": activations,
        "training: LM-head chunk": _lm_head_chunk_bytes(shape, settings, b, training=True),
        "training: gradients": gradients,
    }
    optimizer = {"optimizer: gradients": gradients}

    if shape.vision is not None:  # images encoded per prompt (once per group) or per completion
        per_group = sharing and settings.images_once_per_group
        rollout_images = (N // G if per_group else N) * settings.images_per_prompt
        batch_images = (prompts_in_batch if per_group else b) * settings.images_per_prompt
        encoder = _vision_encoder_bytes(shape.vision, settings, rollout_images, grid)
        generation["generation: vision encoder (no grad)"] = encoder
        scoring["scoring (no grad): vision encoder"] = encoder
        frozen = "trained" if settings.vision_trains else "frozen, no grad"
        training[f"training: vision encoder ({frozen})"] = _vision_training_bytes(
            shape.vision, settings, batch_images, grid
        )

    phases = {
        "generation": sum(generation.values()),
        "scoring": sum(scoring.values()),
        "training": sum(training.values()),
        "optimizer": sum(optimizer.values()),
    }
    for part in (generation, scoring, training):
        components.update(part)
    peak_phase = max(phases, key=phases.get)
    peak = resident + phases[peak_phase]
    notes = [
        f"phases on top of {format_bytes(resident)} resident: "
        + ", ".join(f"{k} {format_bytes(v)}" for k, v in phases.items())
    ]
    if shape.vision is not None:
        notes += _image_notes(shape, settings, components, grid, per_group)
    if settings.device == "cuda":
        components["CUDA context (allowance)"] = CUDA_CONTEXT_BYTES
        components[f"allocator slack (allowance, {ALLOCATOR_SLACK:.0%})"] = int(ALLOCATOR_SLACK * peak)
        peak = int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES
    return MemoryPlan(components, phases, resident, peak, peak_phase, settings, notes)


def _image_notes(shape, settings, components, grid, per_group) -> list[str]:
    """What the images are, and their tokens' share of the KV cache, scoring and training: the difference to the same
    step without images."""
    patches, tokens = grid
    size = "x".join(map(str, settings.image_size)) if settings.image_tokens_per_image is None else "given"
    notes = [
        f"images: {settings.images_per_prompt} per prompt, {size} -> {patches} patches, {tokens} image tokens each "
        f"(patch {shape.vision.patch_size}, merge {shape.vision.merge_size}); prompt = {settings.prompt_length} text "
        f"+ {settings.images_per_prompt * tokens} image tokens; encoded {'once per group' if per_group else 'G times'}"
    ]
    if settings.images_per_prompt and tokens:
        text_only = plan_step(shape, settings.replace(images_per_prompt=0)).components
        names = {"KV cache": "generation: KV cache", "scoring": "scoring (no grad): one layer + hidden states"}
        names["training activations"] = next(name for name in components if name.startswith("training: activations"))
        share = {part: components[name] - text_only[name] for part, name in names.items()}
        notes.append("image tokens' share: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in share.items()))
    return notes


# --- Suggestions and auto-fit ---


def suggestions(shape: ModelShape, settings: StepSettings, budget: int) -> list[tuple[str, MemoryPlan]]:
    """Single changes that bring the predicted peak under `budget`, each with its plan (cheapest in quality first:
    checkpointing and smaller micro-batches change no result; shorter completions and lower ranks do)."""
    candidates = []
    if not settings.gradient_checkpointing:
        candidates.append(("gradient_checkpointing: true", settings.replace(gradient_checkpointing=True)))
    if not settings.prefix_sharing:
        candidates.append(("prefix_sharing: true", settings.replace(prefix_sharing=True)))
    b, N = settings.per_device_train_batch_size, settings.generation_batch_size
    for smaller in _divisors_below(N, b):
        steps = N // smaller
        change = f"per_device_train_batch_size: {smaller}, gradient_accumulation_steps: {steps} (same rollout)"
        candidates.append((change, settings.replace(per_device_train_batch_size=smaller)))
    for smaller in _divisors_below(N, N):
        if smaller % settings.num_generations == 0 and smaller >= b:
            continue  # only rollouts that the micro-batch still divides
        micro = min(b, smaller)
        change = f"generation_batch_size: {smaller} (per device), per_device_train_batch_size: {micro}"
        candidates.append((change, settings.replace(generation_batch_size=smaller, per_device_train_batch_size=micro)))
    for length in (settings.max_completion_length * 3 // 4, settings.max_completion_length // 2):
        candidates.append((f"max_completion_length: {length}", settings.replace(max_completion_length=length)))
    if settings.lora_r is not None and settings.lora_r > 8:
        candidates.append((f"lora_r: {settings.lora_r // 2}", settings.replace(lora_r=settings.lora_r // 2)))
    if shape.vision is not None and not shape.vision.fixed_image_size and settings.image_tokens_per_image is None:
        height, width = settings.image_size
        for smaller in ((height * 3 // 4, width * 3 // 4), (height // 2, width // 2)):
            candidates.append((f"image_size: {smaller[0]}x{smaller[1]}", settings.replace(image_size=smaller)))
    fitting, seen = [], set()
    for change, changed in candidates:
        plan = plan_step(shape, changed)
        kind = change.split(":")[0]
        if plan.peak <= budget and kind not in seen:  # the mildest change of each kind
            seen.add(kind)
            fitting.append((change, plan))
    if not fitting and not settings.gradient_checkpointing:  # no single change: checkpointing plus the rest
        return [
            (f"gradient_checkpointing: true, {change}", plan)
            for change, plan in suggestions(shape, settings.replace(gradient_checkpointing=True), budget)
        ]
    return fitting


def _divisors_below(n: int, limit: int) -> list[int]:
    """Divisors of n smaller than `limit`, largest first."""
    return [d for d in range(limit - 1, 0, -1) if n % d == 0]


def largest_fitting_batch(shape: ModelShape, settings: StepSettings, budget: int) -> int | None:
    """The largest per_device_train_batch_size dividing the rollout whose predicted peak fits `budget` (None: none)."""
    N = settings.generation_batch_size
    for b in [N] + _divisors_below(N, N):
        if plan_step(shape, settings.replace(per_device_train_batch_size=b)).peak <= budget:
            return b
    return None


# --- Reading the model's config and the run's settings ---


def load_model_config(model: str) -> tuple[dict, str]:
    """`(config dict, where it came from)` for a config.json path, a model folder, a model id in the local Hugging
    Face cache, or a model id shipped in grpo_ext/model_configs. Never downloads anything."""
    candidates = [model, os.path.join(model, "config.json")]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json") if "/" in model and not os.path.exists(model) else None
        if isinstance(cached, str):
            candidates.append(cached)
    except (ImportError, ValueError):  # not a valid repo id: only local paths then
        pass
    candidates.append(os.path.join(_MODEL_CONFIG_DIR, model.replace("/", "--") + ".json"))
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as file:
                try:
                    return json.load(file), path
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} is not valid JSON ({error}): give the model's config.json.") from error
    shipped = sorted(name[:-5].replace("--", "/") for name in os.listdir(_MODEL_CONFIG_DIR) if name.endswith(".json"))
    raise FileNotFoundError(
        f"No config.json for {model!r}: not a local file or model folder, not in the local Hugging Face cache, and "
        f"not one of the configs shipped with grpo-ext ({', '.join(shipped)}). Pass the model's config.json with "
        "--model-config PATH (the planner reads only the config, never the weights), or download it once with "
        f"`hf download {model} config.json`."
    )


def _value(values, name, default):
    value = values.get(name, default) if isinstance(values, Mapping) else getattr(values, name, default)
    return default if value is None else value


def parse_image_size(value) -> tuple[int, int]:
    """(height, width) of `448x448`, `448` (a square), `[448, 640]` or a (height, width) tuple."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", str(value))
    if not match:
        raise ValueError(f"image_size {value!r} is not an image size: write HEIGHTxWIDTH, e.g. 448x448.")
    return int(match.group(1)), int(match.group(2) or match.group(1))


def settings_from_config(
    values,
    prompt_length: int | None = None,
    checkpoint_dtype: str | None = None,
    shape: ModelShape | None = None,
    **overrides,
) -> StepSettings:
    """StepSettings from a recipe's values: a YAML mapping, or GRPOExtConfig / ModelConfig objects merged with `|`
    (GRPOExtConfig and TRL ModelConfig field names; TRL's defaults where a field is absent). `checkpoint_dtype`, the
    model config's `dtype`, is what `dtype: auto` loads, except on a CPU without native kernels for it (float32 there,
    as `models.load_causal_lm` loads it). For a vision-language `shape`: the recipe's `image_size` and
    `images_per_prompt`; `max_prompt_length` bounds the whole prompt, images included (the trainer refuses a longer
    one), so the text is what the images leave of it."""
    b = int(_value(values, "per_device_train_batch_size", 8))
    steps = _value(values, "steps_per_generation", None) or _value(values, "gradient_accumulation_steps", 1)
    rollout = int(_value(values, "generation_batch_size", b * steps))
    device = "cpu" if _value(values, "use_cpu", False) else "cuda"
    dtype = _value(values, "dtype", None)
    if dtype == "auto" and device == "cpu" and auto_is_float32(checkpoint_dtype):
        dtype = "float32"
    bf16 = bool(_value(values, "bf16", False))
    dtype_bytes = 2 if bf16 else _DTYPE_BYTES.get(dtype, 2)
    use_peft = bool(_value(values, "use_peft", False))
    targets = _value(values, "lora_target_modules", ["q_proj", "v_proj"])  # PEFT's default for Qwen2 / Llama
    if isinstance(targets, str) and targets != "all-linear":  # PEFT's regex: the layer names it names
        targets = [name for name in ALL_LINEAR if re.search(rf"\b{name}\b", targets)]
    targets = ALL_LINEAR if targets == "all-linear" else tuple(targets)
    needs_reference = float(_value(values, "beta", 0.04)) > 0 or float(_value(values, "reward_kl_coef", 0.0)) > 0
    reference = _value(values, "ref_model_mode", "auto")
    if reference == "auto":
        reference = "none" if not needs_reference else "disabled_adapter" if use_peft else "copy"
    settings = StepSettings(
        per_device_train_batch_size=b,
        generation_batch_size=rollout,
        num_generations=int(_value(values, "num_generations", 8)),
        prompt_length=int(prompt_length or _value(values, "max_prompt_length", DEFAULT_PROMPT_LENGTH)),
        max_completion_length=int(_value(values, "max_completion_length", 512)),
        gradient_checkpointing=bool(_value(values, "gradient_checkpointing", True)),
        prefix_sharing=bool(_value(values, "prefix_sharing", True)),
        logprob_chunk_size=int(_value(values, "logprob_chunk_size", 1024)),
        load_in_4bit=bool(_value(values, "load_in_4bit", False)),
        double_quant=bool(_value(values, "use_bnb_nested_quant", False)),
        dtype_bytes=dtype_bytes,
        lora_r=int(_value(values, "lora_r", 16)) if use_peft else None,
        lora_targets=targets,
        lora_dropout=float(_value(values, "lora_dropout", 0.05)) > 0,
        reference=reference,
        device=device,
        image_size=parse_image_size(_value(values, "image_size", DEFAULT_IMAGE_SIZE)),
        images_per_prompt=int(_value(values, "images_per_prompt", 1)),
    )
    settings = settings.replace(**overrides)
    max_prompt_length = _value(values, "max_prompt_length", None)
    if shape is not None and shape.vision is not None and not prompt_length and max_prompt_length:
        image_tokens = settings.images_per_prompt * image_grid(shape, settings)[1]
        if image_tokens >= max_prompt_length:
            raise ValueError(
                f"max_prompt_length={max_prompt_length} leaves no room for text after {image_tokens} image tokens "
                f"({settings.images_per_prompt} images of {settings.image_size[0]}x{settings.image_size[1]}): raise "
                "it, or use smaller images (image_size)."
            )
        settings = settings.replace(prompt_length=max_prompt_length - image_tokens)
    return settings


def run_step_inputs(
    args, model_config, peft_config=None, load_in_4bit: bool = False
) -> tuple[ModelShape, StepSettings]:
    """The model shape and step settings of a trainer's run: its config (`GRPOExtConfig`, as resolved), the loaded
    model's config (a `PretrainedConfig` or dict) and its LoRA config (None: full fine-tuning)."""
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    kind = config.get("model_type") or "this"
    shape = ModelShape.from_config(
        config,
        f"gpu_memory_budget={args.gpu_memory_budget!r}: the model's config ({kind} architecture)",
        "The planner cannot model this architecture: unset gpu_memory_budget and set per_device_train_batch_size "
        "(and gradient_accumulation_steps) yourself.",
    )
    peft = {}
    if peft_config is not None:
        targets = peft_config.target_modules
        peft = dict(
            use_peft=True,
            lora_r=peft_config.r,
            lora_dropout=peft_config.lora_dropout,
            lora_target_modules=targets if isinstance(targets, str) else sorted(targets or ALL_LINEAR),
        )
    values = {**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)}, **peft}
    values["generation_batch_size"] = args.generation_batch_size // args.world_size
    values["dtype"] = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return shape, settings_from_config(values, shape=shape, load_in_4bit=load_in_4bit, double_quant=True)


@dataclass(frozen=True)
class FittedBatch:
    """The micro-batch `gpu_memory_budget` fits (`fit_batch_size`), for `GRPOExtConfig.resize_micro_batch`: the rollout
    is kept, so each rollout is `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    summary: str  # the line the trainer shows at start: the choice and its predicted peak


def fit_batch_size(args, model_config, peft_config=None, load_in_4bit: bool = False) -> FittedBatch:
    """`gpu_memory_budget`: the largest micro-batch whose predicted step fits, keeping the rollout
    (`generation_batch_size`) and so the completions per optimizer step. `args` is read, not changed. Raises with the
    planner's suggestions when even one completion per micro-batch does not fit."""
    budget = parse_memory(args.gpu_memory_budget)
    shape, settings = run_step_inputs(args, model_config, peft_config, load_in_4bit)
    b = largest_fitting_batch(shape, settings, budget)
    if b is None:
        plan = plan_step(shape, settings.replace(per_device_train_batch_size=1))
        hints = "; ".join(f"{change} -> {format_bytes(p.peak)}" for change, p in suggestions(shape, settings, budget))
        raise ValueError(
            f"gpu_memory_budget={args.gpu_memory_budget}: even per_device_train_batch_size=1 is predicted to need "
            f"{format_bytes(plan.peak)} ({plan.peak_phase} phase). Changes predicted to fit: {hints or 'none found'}."
        )
    steps = settings.generation_batch_size // b
    peak = plan_step(shape, settings.replace(per_device_train_batch_size=b)).peak
    summary = (
        f"[grpo-ext] gpu_memory_budget {args.gpu_memory_budget}: per_device_train_batch_size={b}, "
        f"gradient_accumulation_steps={steps} (predicted peak {format_bytes(peak)}; {verdict(peak, budget)})"
    )
    return FittedBatch(per_device_train_batch_size=b, gradient_accumulation_steps=steps, summary=summary)


def plan_config_file(
    path: str,
    model_config: str | None = None,
    prompt_length: int | None = None,
    reward_models: tuple[str, ...] = (),
    **overrides,
) -> tuple[ModelShape, StepSettings]:
    """The model shape and step settings of a recipe YAML (`overrides`: StepSettings fields, as the CLI sets them)."""
    import yaml

    with open(path) as file:
        values = yaml.safe_load(file) or {}
    model = model_config or values.get("model_name_or_path")
    if not model:
        raise ValueError(f"{path} has no model_name_or_path: pass --model-config with the model's config.json.")
    if not model_config and values.get("model_config_id") and not os.path.exists(model):
        model = values["model_config_id"]  # a folder a prepare script writes: its config is known before it exists
    config, source = load_model_config(model)
    shape = ModelShape.from_config(config, source)
    rewards = tuple(ModelShape.from_config(*load_model_config(r)) for r in reward_models)
    checkpoint_dtype = config.get("dtype") or config.get("torch_dtype")
    settings = settings_from_config(
        values, prompt_length, checkpoint_dtype, shape, reward_model_shapes=rewards, **overrides
    )
    return shape, settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_ext.plan", description="Predict the peak GPU memory of one GRPO step of a recipe."
    )
    parser.add_argument("--config", required=True, help="a recipe YAML (recipes/configs/*.yaml)")
    parser.add_argument("--gpu-memory", help="the GPU's memory, e.g. 8GiB, 24GB; with it: a verdict and suggestions")
    parser.add_argument("--model-config", help="config.json path or model id, instead of the recipe's model")
    parser.add_argument(
        "--prompt-length", type=int, help=f"prompt tokens (default: max_prompt_length or {DEFAULT_PROMPT_LENGTH})"
    )
    parser.add_argument("--reward-model", action="append", default=[], help="config of a reward model (repeatable)")
    images = parser.add_argument_group("vision-language models")
    images.add_argument(
        "--image-size",
        type=parse_image_size,
        help="HEIGHTxWIDTH of each image (default: the recipe's image_size, or "
        f"{DEFAULT_IMAGE_SIZE[0]}x{DEFAULT_IMAGE_SIZE[1]})",
    )
    images.add_argument("--images-per-prompt", type=int, help="default: the recipe's images_per_prompt, or 1")
    images.add_argument(
        "--image-tokens", type=int, help="image tokens per image, instead of counting them from the size"
    )
    images.add_argument(
        "--images-per-completion",
        action="store_true",
        help="each completion's images encoded (G per group), instead of once per group with prefix sharing",
    )
    images.add_argument("--vision-4bit", action="store_true", help="the vision layers' linear weights in NF4 too")
    images.add_argument("--vision-lora", action="store_true", help="LoRA on the vision layers too (default: frozen)")
    cli = parser.parse_args(argv)
    budget = None
    if cli.gpu_memory is not None:
        try:
            budget = parse_memory(cli.gpu_memory)
        except ValueError as error:
            parser.error(f"--gpu-memory {cli.gpu_memory}: {error}")
    image_options = {
        "image_size": cli.image_size,
        "images_per_prompt": cli.images_per_prompt,
        "image_tokens_per_image": cli.image_tokens,
        "images_once_per_group": False if cli.images_per_completion else None,
        "vision_load_in_4bit": cli.vision_4bit or None,
        "vision_trains": cli.vision_lora or None,
    }
    overrides = {name: value for name, value in image_options.items() if value is not None}
    shape, settings = plan_config_file(
        cli.config, cli.model_config, cli.prompt_length, tuple(cli.reward_model), **overrides
    )
    plan = plan_step(shape, settings)
    images = settings.images_per_prompt * image_grid(shape, settings)[1]
    print(  # noqa: T201 - the command line's output
        f"{cli.config}: {settings.per_device_train_batch_size} completions per micro-batch, "
        f"{settings.generation_batch_size} per rollout, G={settings.num_generations}, P={settings.prompt_length}"
        + (f" text + {images} image tokens" if shape.vision is not None else "")
        + f", C={settings.max_completion_length}"
    )
    print(plan.table(budget))  # noqa: T201 - the command line's output
    if budget is not None and plan.peak > budget:
        fixes = suggestions(shape, settings, budget)
        print("changes predicted to fit:" if fixes else "no single change found that fits; try a smaller model.")  # noqa: T201 - the command line's output
        for change, fixed in fixes:
            print(f"  {change}: {format_bytes(fixed.peak)}")  # noqa: T201 - the command line's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
