"""grpo_ext.plan: predicted peaks against measured CPU peaks, suggestions, auto-fit, the CLI on every recipe, errors."""

import glob
import os
import sys

import pytest

from grpo_ext.plan import (
    GiB,
    ModelShape,
    StepSettings,
    fit_batch_size,
    largest_fitting_batch,
    load_model_config,
    main,
    parse_memory,
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
