"""grpo_ext.plan: predicted peaks against measured CPU peaks, suggestions, auto-fit, the CLI on every recipe, errors."""

import glob
import os
import sys

import pytest

from grpo_ext.plan import (
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    GiB,
    ModelShape,
    StepSettings,
    base_weight_bytes,
    fit_batch_size,
    largest_fitting_batch,
    load_model_config,
    main,
    parse_memory,
    plan_config_file,
    plan_step,
    settings_from_config,
    suggestions,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import plan_check  # noqa: E402

QWEN_7B = ModelShape.from_config(load_model_config("Qwen/Qwen2.5-7B-Instruct")[0])


# Four settings measured on the CPU (each in its own process): plain, prefix sharing, gradient checkpointing, and a
# large vocabulary with a small LM-head chunk. The benchmark (benchmarks/plan_check.py) runs these and bigger ones.
def test_prediction_within_15_percent_of_measured_peak():
    rows = plan_check.compare_all(["test-plain", "test-shared", "test-checkpointed", "test-lm-head"], parallel=True)
    for row in rows:
        assert 0.85 <= row["ratio"] <= 1.15, plan_check.markdown_table(rows)


def test_suggestions_make_an_oversized_config_fit():
    oversized = StepSettings(
        per_device_train_batch_size=64,
        generation_batch_size=64,
        num_generations=8,
        max_completion_length=1024,
        gradient_checkpointing=False,
        load_in_4bit=True,
    )
    budget = 16 * GiB
    assert plan_step(QWEN_7B, oversized).peak > budget
    fixes = suggestions(QWEN_7B, oversized, budget)
    assert fixes
    for change, plan in fixes:
        assert plan.peak <= budget, change
    assert any("gradient_checkpointing" in change for change, _ in fixes)


def test_largest_fitting_batch_grows_with_the_budget():
    settings = StepSettings(generation_batch_size=64, load_in_4bit=True, gradient_checkpointing=False)
    small, large = (largest_fitting_batch(QWEN_7B, settings, budget * GiB) for budget in (16, 40))
    assert (small, large) == (1, 8)  # divisors of the rollout of 64
    assert plan_step(QWEN_7B, settings.replace(per_device_train_batch_size=large)).peak <= 40 * GiB
    assert plan_step(QWEN_7B, settings.replace(per_device_train_batch_size=2 * large)).peak > 40 * GiB
    assert largest_fitting_batch(QWEN_7B, settings, 1 * GiB) is None


def test_checkpointing_and_sharing_lower_the_training_phase():
    settings = StepSettings(load_in_4bit=True, gradient_checkpointing=False, prefix_sharing=False)
    plain = plan_step(QWEN_7B, settings).phases["training"]
    assert plan_step(QWEN_7B, settings.replace(gradient_checkpointing=True)).phases["training"] < plain
    assert plan_step(QWEN_7B, settings.replace(prefix_sharing=True)).phases["training"] < plain


def test_gpu_memory_budget_picks_the_micro_batch(make_args):
    from peft import LoraConfig

    lora = LoraConfig(r=16, target_modules="all-linear")
    config = load_model_config("HuggingFaceTB/SmolLM2-135M-Instruct")[0]
    shape = ModelShape.from_config(config)
    probe = make_args(per_device_train_batch_size=8, num_generations=4, max_completion_length=256)
    settings = settings_from_config({**vars(probe), "use_peft": True, "lora_target_modules": "all-linear"})
    budget = plan_step(shape, settings.replace(per_device_train_batch_size=2)).peak + 2**20
    args = make_args(
        per_device_train_batch_size=8, num_generations=4, max_completion_length=256, gpu_memory_budget=f"{budget}B"
    )
    fitted = fit_batch_size(args, config, lora)
    assert (fitted.per_device_train_batch_size, fitted.gradient_accumulation_steps) == (2, 4)
    assert "per_device_train_batch_size=2" in fitted.summary
    assert (args.per_device_train_batch_size, args.steps_per_generation) == (8, 1)  # the config is not changed
    args.resize_micro_batch(fitted.per_device_train_batch_size, fitted.gradient_accumulation_steps)
    assert args.per_device_train_batch_size == 2
    assert args.gradient_accumulation_steps == args.steps_per_generation == 4  # the rollout of 8 is kept
    assert args.generation_batch_size == 8
    with pytest.raises(ValueError, match="even per_device_train_batch_size=1"):
        fit_batch_size(make_args(gpu_memory_budget="1MiB"), config, lora)


def test_bad_budget_string_is_refused_by_the_config(make_args):
    from grpo_ext.settings import check_settings

    with pytest.raises(ValueError, match="gpu_memory_budget='lots'.*8GiB"):
        check_settings(make_args(gpu_memory_budget="lots"))  # the planner's rule, at trainer start
    assert parse_memory("8GiB") == parse_memory("8 GB") == 8 * GiB
    assert parse_memory("512MiB") == 2**29


def test_unknown_model_without_config_names_the_model_and_the_fix():
    with pytest.raises(FileNotFoundError, match=r"someone/unknown-model.*--model-config"):
        load_model_config("someone/unknown-model")


def test_config_without_needed_fields_names_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "qwen2", "hidden_size": 64}')
    with pytest.raises(ValueError, match=r"no intermediate_size, num_hidden_layers.*--model-config"):
        ModelShape.from_config(*load_model_config(str(path)))


_DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


@pytest.mark.parametrize(
    "config, named",
    [
        # as saved by transformers: NemotronH lists its Mamba layers in layers_block_type, Falcon-H1 nowhere
        (dict(model_type="nemotron_h", layers_block_type=["mamba", "attention"], **_DENSE), "'nemotron_h'.*Mamba-2"),
        (dict(model_type="falcon_h1", **_DENSE), "'falcon_h1'.*Mamba-2"),
        (dict(text_config=dict(model_type="qwen3_5_text", **_DENSE)), "'qwen3_5_text'.*linear-attention"),
        # a family this table does not know, by its layer types
        (dict(model_type="new_hybrid", layer_types=["linear_attention", "full_attention"], **_DENSE), "'new_hybrid'"),
    ],
)
def test_models_with_recurrent_layers_are_refused_by_model_type(config, named):
    with pytest.raises(ValueError, match=rf"cannot plan model_type {named}.*recurrent state"):
        ModelShape.from_config(config)


def test_sliding_window_transformers_are_still_planned():
    shape = ModelShape.from_config(dict(model_type="gemma3_text", layer_types=["sliding_attention"] * 2, **_DENSE))
    assert shape.num_layers == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "configs", "*.yaml"))))
def test_cli_plans_every_shipped_recipe(path, capsys, monkeypatch, tmp_path):
    """Offline, with nothing prepared: a recipe on a local folder (the demos) names the model it will hold."""
    monkeypatch.chdir(tmp_path)  # no outputs/ folder here
    argv = ["--config", path, "--gpu-memory", "24GiB" if "24gb" in path else "8GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "peak (" in out and "fits" in out


def test_gpu_check_dry_run_writes_its_json(tmp_path, monkeypatch):
    import json

    import gpu_check

    monkeypatch.chdir(ROOT)
    output = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--trainers", "grpo-ext", "--output", str(output)]) == 0
    (run,) = json.loads(output.read_text())["runs"]
    assert run["trainer"] == "grpo-ext" and run["predicted_peak_bytes"] > 0 and run["seconds_per_step"] > 0


# --- Vision-language models ---

QWEN_VL_7B = ModelShape.from_config(load_model_config("Qwen/Qwen2.5-VL-7B-Instruct")[0])
_TINY_TEXT = dict(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    bos_token_id=None, eos_token_id=None,  # no special tokens in a 300-token vocabulary
)  # fmt: skip
_TINY_VISION = {
    "qwen2_5_vl": dict(
        depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[1]
    ),
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2),
    "gemma3": dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
    ),  # fmt: skip
}


def _tiny_vlm(family: str, tied: bool):
    """A randomly initialised vision-language model of `family`, built here from a small config."""
    import transformers

    text = dict(_TINY_TEXT)
    if family == "gemma3":
        text = dict(text, head_dim=8, rope_scaling=None)
    names = {"qwen2_5_vl": "Qwen2_5_VL", "qwen2_vl": "Qwen2VL", "gemma3": "Gemma3"}[family]
    config_class = getattr(transformers, f"{names}Config")
    extra = dict(mm_tokens_per_image=4) if family == "gemma3" else {}  # 4 x 4 patches pooled to 2 x 2 tokens
    config = config_class(text_config=text, vision_config=_TINY_VISION[family], tie_word_embeddings=tied, **extra)
    return getattr(transformers, f"{names}ForConditionalGeneration")(config)


@pytest.mark.parametrize(
    "family, tied", [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen2_vl", False), ("gemma3", True)]
)
def test_parameter_counts_equal_a_tiny_model_built_from_the_config(family, tied):
    model = _tiny_vlm(family, tied)
    shape = ModelShape.from_config(model.config.to_dict())
    inner = model.model
    vision = inner.visual if hasattr(inner, "visual") else [inner.vision_tower, inner.multi_modal_projector]
    vision = vision if isinstance(vision, list) else [vision]
    assert sum(shape.vision.parameters().values()) == sum(p.numel() for m in vision for p in m.parameters())
    if (
        family != "gemma3"
    ):  # Gemma 3's language model has q/k norms and four norms a layer, which the planner rounds off
        language_model = sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for m in vision for p in m.parameters()
        )
        one_byte = StepSettings(dtype_bytes=1)  # one byte per weight: the count
        assert base_weight_bytes(shape, one_byte)["base weights"] == language_model
    assert shape.tied_embeddings == tied


@pytest.mark.parametrize(
    "size, vision_params, total", [("3B", 668_684_288, 3_754_622_976), ("7B", 676_550_144, 8_292_166_656)]
)
def test_shipped_qwen2_5_vl_configs_count_what_transformers_builds(size, vision_params, total):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = load_model_config(f"Qwen/Qwen2.5-VL-{size}-Instruct")[0]
    with torch.device("meta"):  # shapes only
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    assert sum(p.numel() for p in model.model.visual.parameters()) == vision_params
    assert sum(p.numel() for p in model.parameters()) == total  # 3.75B and 8.29B, as published
    shape = ModelShape.from_config(config)
    assert sum(shape.vision.parameters().values()) == vision_params
    one_byte = StepSettings(dtype_bytes=1)
    assert base_weight_bytes(shape, one_byte)["base weights"] == total - vision_params


@pytest.mark.parametrize("height, width", [(448, 448), (500, 300), (2000, 1000), (20, 20), (3000, 3000)])
def test_image_tokens_per_image_are_what_the_qwen_processor_makes(height, width):
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)  # Qwen2.5-VL's
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    t, h, w = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    patches, tokens = QWEN_VL_7B.vision.image_grid(height, width)
    assert (patches, tokens) == (t * h * w, t * h * w // 4)  # 2 x 2 patches merged into one token
    if (height, width) == (448, 448):
        assert (patches, tokens) == ((448 // 14) ** 2, (448 // 28) ** 2) == (1024, 256)


def test_image_tokens_are_prompt_tokens_of_the_kv_cache():
    settings = StepSettings(load_in_4bit=True, prompt_length=100, image_size=(448, 896), images_per_prompt=2)
    P = 100 + 2 * (448 // 28) * (896 // 28)  # 100 text + 2 x 512 image tokens
    plan = plan_step(QWEN_VL_7B, settings)
    shape = QWEN_VL_7B
    N, C = settings.generation_batch_size, settings.max_completion_length
    assert plan.components["generation: KV cache"] == 2 * shape.num_layers * shape.kv_dim * N * (P + C) * 2
    given = plan_step(QWEN_VL_7B, settings.replace(image_size=(1, 1), image_tokens_per_image=512))
    assert given.components["generation: KV cache"] == plan.components["generation: KV cache"]
    assert any("image tokens' share: KV cache" in note for note in plan.notes)


def test_images_are_encoded_once_per_group_or_g_times():
    settings = StepSettings(load_in_4bit=True, generation_batch_size=32, per_device_train_batch_size=16)
    G = settings.num_generations
    once = plan_step(QWEN_VL_7B, settings).components
    per_completion = plan_step(QWEN_VL_7B, settings.replace(images_once_per_group=False)).components
    for name in ("generation: vision encoder (no grad)", "training: vision encoder (frozen, no grad)"):
        assert per_completion[name] == G * once[name]  # the working set grows with the images encoded at once
    no_sharing = plan_step(QWEN_VL_7B, settings.replace(prefix_sharing=False)).components
    assert no_sharing["scoring (no grad): vision encoder"] == per_completion["scoring (no grad): vision encoder"]


def test_vision_tower_is_16_bit_and_frozen_unless_told():
    settings = StepSettings(load_in_4bit=True, lora_r=16, gradient_checkpointing=True)
    vision = QWEN_VL_7B.vision
    params = sum(vision.parameters().values())
    plan = plan_step(QWEN_VL_7B, settings)
    assert plan.components["vision tower + projector (16-bit)"] == 2 * params
    four_bit = plan_step(QWEN_VL_7B, settings.replace(vision_load_in_4bit=True)).components
    assert sum(v for k, v in four_bit.items() if k.startswith("vision tower")) < 0.4 * 2 * params
    # frozen: the training forward keeps nothing for the backward, only the working set of one no-grad forward
    training = plan.components["training: vision encoder (frozen, no grad)"]
    assert training == plan.components["generation: vision encoder (no grad)"]  # 1 prompt, so 1 image, in each
    trained = plan_step(QWEN_VL_7B, settings.replace(vision_trains=True))
    lora = 16 * sum(i + o for i, o in vision.linear_layers().values()) * vision.num_layers
    assert trained.components["LoRA weights (fp32)"] - plan.components["LoRA weights (fp32)"] == 4 * lora
    assert trained.components["training: vision encoder (trained)"] > training


def test_max_prompt_length_holds_the_image_tokens_and_lora_regex_names_layers():
    values = dict(
        max_prompt_length=512, image_size="448x448", use_peft=True, lora_target_modules=r".*\.(q_proj|v_proj)"
    )
    settings = settings_from_config(values, shape=QWEN_VL_7B)
    assert settings.prompt_length == 512 - 256 and settings.lora_targets == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="max_prompt_length=200 leaves no room for text after 256 image tokens"):
        settings_from_config(dict(values, max_prompt_length=200), shape=QWEN_VL_7B)


def test_vision_config_of_an_unknown_family_is_refused_by_name():
    config = dict(model_type="llava", text_config=dict(model_type="llama", **_DENSE), vision_config=dict(hidden_size=8))
    with pytest.raises(ValueError, match=r"vision tower of model_type 'llava'.*gemma3, qwen2_5_vl, qwen2_vl"):
        ModelShape.from_config(config)


def test_vlm_recipe_fits_24gb_with_and_without_prefix_sharing(capsys):
    path = os.path.join(ROOT, "recipes", "configs", "qwen2.5-vl-7b-instruct-multimodal-r1-24gb.yaml")
    for extra in ([], ["--images-per-completion"]):
        assert main(["--config", path, "--gpu-memory", "24GiB", *extra]) == 0
        out = capsys.readouterr().out
        assert "P=256 text + 256 image tokens" in out and "vision tower + projector (16-bit)" in out
        assert "fits 24.00 GiB" in out
    shape, settings = plan_config_file(path)
    assert plan_step(shape, settings.replace(prefix_sharing=False)).peak <= 24 * GiB
    assert plan_step(shape, settings).peak <= 20 * GiB
    shape_3b, settings_3b = plan_config_file(path, model_config="Qwen/Qwen2.5-VL-3B-Instruct")
    assert plan_step(shape_3b, settings_3b).peak < plan_step(shape, settings).peak
