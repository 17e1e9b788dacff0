"""GGUF for llama.cpp, LM Studio and Ollama: a transformers llama-family (Llama, SmolLM2) or Qwen2 model and its
byte-level BPE tokenizer written with the gguf package's own writer, tensor-name map and quantisers.

The layout is llama.cpp's: tensors renamed by `gguf.get_tensor_name_map`, Llama's q / k projections permuted from
transformers' rotate-half rotary layout to the interleaved pairs llama.cpp's llama graph rotates (Qwen2 uses
llama.cpp's NeoX rotation, transformers' layout, so it is not permuted), 1-D tensors (norms, biases) in float32,
the tied output projection left out. The tokenizer goes in the metadata as llama.cpp's `gpt2` model: every token
with its type, the merges, the pre-tokenizer name, bos / eos / unk / pad ids and the chat template.

    write_gguf(model, tokenizer, "model-q8_0.gguf", quant="q8_0", stop_token_ids=[2])
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")  # transformers model_type -> llama.cpp architecture of the same name
PERMUTED_ARCHITECTURES = ("llama",)  # rotary embedding on interleaved pairs in llama.cpp: q / k rows reordered


def _converted(data: np.ndarray, ggml_type: str | None):
    """`data` (float32, 2-D) as the file stores it: f16 for `None`, else in GGML blocks of `ggml_type` along each row
    (the gguf package's numpy quantiser), with a row that is not a whole number of blocks left f16 as llama.cpp's
    converter does. Returns `(array, raw GGML type or None)`."""
    import gguf

    quant_type = gguf.GGMLQuantizationType[ggml_type] if ggml_type is not None else None
    if quant_type is None or data.shape[-1] % gguf.GGML_QUANT_SIZES[quant_type][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, quant_type), quant_type


# --quant name -> (GGML type of the layers' 2-D weights, of the token embeddings and output projection; None: f16,
# llama.cpp file type name). Q8_0 / Q5_0 / Q4_0: blocks of 32 weights with one f16 scale each. q5_0 and q4_0 keep the
# embeddings and output projection in Q8_0: they are read once per token each and their rounding costs the most
# (llama.cpp's own q4_0 keeps the output projection at 6 bits, which the gguf package cannot write).
QUANTS: dict[str, tuple[str | None, str | None, str]] = {
    "f16": (None, None, "MOSTLY_F16"),
    "q8_0": ("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q5_0": ("Q5_0", "Q8_0", "MOSTLY_Q5_0"),
    "q4_0": ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")


def check_architecture(config) -> str:
    """The architecture name of a model `config` that can be written as GGUF here; a ValueError naming it otherwise."""
    architecture = getattr(config, "model_type", None)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports the {SUPPORTED_ARCHITECTURES} architectures (Llama, SmolLM2, Qwen2 / Qwen2.5); "
            f"this model is {architecture!r}. Export --format merged and convert it with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more architectures."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"GGUF export writes plain rotary embeddings; this model uses rope_type={rope['rope_type']!r}. Export "
            "--format merged and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return architecture


def write_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    quant: str = "f16",
    stop_token_ids: Sequence[int] = (),
    name: str | None = None,
) -> str:
    """Write `model` (a transformers Llama / Qwen2 causal LM) and `tokenizer` to the GGUF file `path`, its 2-D
    weights in `quant` (`QUANTS`). `stop_token_ids`: the tokens generation stops at (the first one that is not the
    tokenizer's EOS becomes llama.cpp's end-of-turn token). Written to a temporary file renamed at the end, so an
    error leaves no partial file at `path`. Returns `path`."""
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r} is not a GGUF type written here: use one of {tuple(QUANTS)}.")
    architecture = check_architecture(model.config)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, partial = tempfile.mkstemp(prefix=".partial-", suffix=".gguf", dir=folder)
    os.close(handle)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(partial, 0o666 & ~mask)  # mkstemp's file is private; the GGUF file is an ordinary one
    try:
        writer = gguf.GGUFWriter(partial, architecture)
        _add_hyperparameters(writer, model.config, quant, name or os.path.splitext(os.path.basename(path))[0])
        _add_tokenizer(writer, tokenizer, model.config.vocab_size, stop_token_ids)
        _add_tensors(writer, model, architecture, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    logger.info("Wrote %s (%s, %s)", path, architecture, quant)
    return path


def _add_hyperparameters(writer, config, quant: str, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][2]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half rows of each head -> llama.cpp's interleaved pairs (its converter's `permute`)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _file_tensors(model: nn.Module, architecture: str, quant: str):
    """`(gguf name, array, raw GGML type or None)` of each tensor the file holds, in llama.cpp's layout."""
    import gguf

    config = model.config
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    weight_type, embedding_type = QUANTS[quant][:2]
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":  # llama.cpp reuses token_embd when output.weight is absent
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"The {architecture} model has a tensor {hf_name!r} with no llama.cpp name: not exported.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if architecture in PERMUTED_ARCHITECTURES and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _permute(data, config.num_attention_heads)
        elif architecture in PERMUTED_ARCHITECTURES and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim < 2:  # norms and biases: float32, as llama.cpp keeps them
            yield gguf_name, data, None
            continue
        yield gguf_name, *_converted(data, embedding_type if gguf_name in EMBEDDING_TENSORS else weight_type)


def _add_tensors(writer, model: nn.Module, architecture: str, quant: str) -> None:
    for gguf_name, data, raw_type in _file_tensors(model, architecture, quant):
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)


def file_rounded(model: nn.Module, quant: str) -> nn.Module:
    """A float32 copy of `model` whose weights hold what a GGUF file of `quant` stores, dequantised: what the file's
    reader computes with, for the export's drift table (the q / k permutation is exact and left out)."""
    import gguf

    rounded = copy.deepcopy(model).float()
    weight_type, embedding_type = QUANTS[quant][:2]
    layers = (rounded.get_input_embeddings(), rounded.get_output_embeddings())  # EMBEDDING_TENSORS in the file
    embeddings = [layer.weight for layer in layers if layer is not None]
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.ndim < 2:  # float32 in the file
                continue
            embedding = any(parameter is e for e in embeddings)
            data, raw_type = _converted(parameter.cpu().numpy(), embedding_type if embedding else weight_type)
            values = gguf.quants.dequantize(data, raw_type) if raw_type is not None else data
            parameter.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(parameter.shape))
    return rounded


# --- Tokenizer ---

# llama.cpp's pre-tokenizer names for the splitting rules of common byte-level BPE tokenizers (`tokenizer.ggml.pre`).
QWEN2_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"


def _pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE: it must match, or llama.cpp tokenizes text
    differently than training did."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    splits = [step.get("pattern", {}).get("Regex", "") for step in steps if step.get("type") == "Split"]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM / SmolLM2: digits one by one, then GPT-2's split
    if splits and splits[0].startswith(QWEN2_SPLIT_START):
        return "qwen2"
    if splits and splits[0].startswith(LLAMA3_SPLIT_START):
        return "llama-bpe"
    raise ValueError(
        f"The tokenizer's pre-tokenizer ({kinds}) is not one llama.cpp is known here to reproduce (GPT-2, SmolLM2, "
        "Qwen2, Llama 3): export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def _token_types(tokenizer, tokens: list[str | None]) -> list[int]:
    import gguf

    added = tokenizer.added_tokens_decoder
    types = []
    for token_id, token in enumerate(tokens):
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def _add_tokenizer(writer, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = state.get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel" or any(
        step.get("type") == "ByteLevel" for step in decoder.get("decoders", [])
    )
    if state["model"]["type"] != "BPE" or not byte_level:
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, Llama 3); this one is "
            f"{state['model']['type']} (decoder {decoder.get('type')}). Export --format merged and convert it with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"The tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings.")
    # rows of the embedding no token uses (vocabularies padded to a multiple) get placeholder names, as llama.cpp's
    tokens = [by_id.get(i) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list([token if token is not None else f"[PAD{i}]" for i, token in enumerate(tokens)])
    writer.add_token_types(_token_types(tokenizer, tokens))
    with tempfile.TemporaryDirectory() as folder:  # the gguf package reads merges from a saved tokenizer.json
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # the special ids the run used, not the package's guesses from the saved files
    special.special_token_ids = {
        kind: token_id
        for kind, token_id in (
            ("bos", tokenizer.bos_token_id),
            ("eos", tokenizer.eos_token_id),
            ("unk", tokenizer.unk_token_id),
            ("pad", tokenizer.pad_token_id),
            ("eot", next((i for i in stop_token_ids if i != tokenizer.eos_token_id), None)),
        )
        if token_id is not None
    }
    encoded = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and encoded[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and encoded[-1:] == [tokenizer.eos_token_id],
    }
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
