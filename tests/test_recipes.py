"""Recipes: every config parses and validates, the script runs end to end offline, evaluate.py works."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM
from trl import ModelConfig, TrlParser

from grpo_ext import GRPOExtConfig
from grpo_ext.settings import check_settings
from grpo_ext.testing import make_arithmetic_splits

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def _recipe_module():
    spec = importlib.util.spec_from_file_location("deepseek_math_style", ROOT / "recipes" / "deepseek_math_style.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_recipe_config_parses_and_validates(config):
    recipe = _recipe_module()
    parser = TrlParser((recipe.ScriptArguments, GRPOExtConfig, ModelConfig))
    # use_cpu so GPU configs validate on this machine; nothing is loaded
    script_args, training_args, model_args = parser.parse_args_and_config(
        ["--config", str(config), "--use_cpu", "true"]
    )
    check_settings(training_args)  # and every module's check, as the recipe's parser runs it
    assert training_args.generation_batch_size % training_args.num_generations == 0
    assert model_args.model_name_or_path and script_args.reward_funcs
    if model_args.load_in_4bit:
        assert model_args.use_peft  # 4-bit bases are only trained through an adapter
    from reward_models import get_reward_funcs

    assert len(
        get_reward_funcs(
            script_args.reward_funcs, warn_unused=False, max_len=8, max_completion_len=8, soft_punish_cache=2
        )
    ) == len(script_args.reward_funcs)


# --- Value types of a recipe YAML, checked before the parser (grpo_ext.recipe) ---


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_steps": 1.5}, r"max_steps is 1.5 \(float\), but max_steps takes int\."),
        ({"lora_target_modules": 5}, r"lora_target_modules is 5 \(int\), but lora_target_modules takes a list of str"),
        ({"num_generations": "eight"}, r"num_generations is 'eight' \(str\), but num_generations takes int"),
        ({"learning_rate": True}, r"learning_rate takes float"),
        ({"reward_weights": [1.0, "x"]}, r"reward_weights takes a list of float or null"),
        ({"use_peft": "maybe"}, r"use_peft takes bool"),
        ({"model_init_kwargs": 3}, r"model_init_kwargs takes a mapping or str or null"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(values, message):
    from trl import ModelConfig

    from grpo_ext.recipe import check_config_types

    with pytest.raises(TypeError, match=rf"^run.yaml: .*{message}"):
        check_config_types(values, (GRPOExtConfig, ModelConfig), source="run.yaml")


def test_config_values_the_parser_accepts_pass():
    from trl import ModelConfig

    from grpo_ext.recipe import check_config_types

    check_config_types(
        {
            "learning_rate": "1e-5",  # YAML reads 1e-5 without a dot as a string; the parser converts it
            "max_steps": 10,
            "warmup_ratio": 0,
            "bf16": "true",
            "lora_target_modules": "all-linear",
            "report_to": "none",
            "lr_scheduler_type": "cosine",
            "resume_from_checkpoint": True,
            "model_init_kwargs": {"dtype": "bfloat16"},
            "max_prompt_length": None,
            "not_a_field": object(),  # unknown names are the parser's to report
        },
        (GRPOExtConfig, ModelConfig),
    )


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs(name):
    config = yaml.safe_load((ROOT / "recipes" / "accelerate_configs" / f"{name}.yaml").read_text())
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config["distributed_type"] == expected and config["mixed_precision"] == "bf16"


def test_demo_evaluates_on_problems_training_never_saw():
    train, test = make_arithmetic_splits()
    assert len(test) == 100 and len(train) > 300
    assert not set(train["prompt"]) & set(test["prompt"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--export", "onnx"], r"export: \['onnx'\] are not export formats"),
        (["--export_quant", "q3_k"], "export_quant='q3_k'"),
    ],
)
def test_recipe_refuses_an_unknown_export_before_training(override, message):
    from grpo_ext.recipe import parse_recipe_args

    with pytest.raises(ValueError, match=message):
        parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / "tiny-cpu.yaml"), *override])


@pytest.mark.slow  # the recipe end to end
def test_recipe_runs_end_to_end_and_evaluate_py_reads_its_adapter(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)  # noqa: E731
    prepared = run(ROOT / "recipes" / "prepare_demo.py", tmp_path / "demo", "--warm_up_steps", "5")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    output_dir = tmp_path / "grpo"
    trained = run(
        ROOT / "recipes" / "deepseek_math_style.py",
        "--config", ROOT / "recipes" / "configs" / "tiny-cpu.yaml",
        "--model_name_or_path", tmp_path / "demo" / "base-model",
        "--dataset_name", tmp_path / "demo" / "data" / "train.jsonl",
        "--dataset_test_name", tmp_path / "demo" / "data" / "test.jsonl",
        "--output_dir", output_dir,
        "--max_steps", "2",
        "--save_steps", "1",
        "--eval_steps", "1",
        "--eval_max_problems", "8",
        "--disable_tqdm", "true",
        "--export", "merged",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "held-out pass@1 (accuracy):" in trained.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json", "resolved_config.yaml", "eval_results.json"):
        assert (output_dir / name).exists(), name
    assert not (output_dir / "model.safetensors").exists()  # only the adapter, never base weights
    resolved = yaml.safe_load((output_dir / "resolved_config.yaml").read_text())
    assert resolved["max_steps"] == 2 and resolved["lora_r"] == 16 and resolved["load_in_4bit"] is True
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["before"]["eval_task_problems"] == results["after"]["eval_task_problems"] == 8
    # evaluated during training too: the task metric in the log at steps 1 and 2, the best checkpoint kept
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluated_steps = [entry["step"] for entry in state["log_history"] if "eval_pass@1/accuracy" in entry]
    assert evaluated_steps == [0, 1, 2, 2]  # before training, at each eval step, the delivered model after
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{state['best_global_step']}")
    # `export: [merged]`: the QLoRA adapter merged into the dequantised NF4 base, a folder transformers loads alone
    exported = json.loads((output_dir / "export" / "export.json").read_text())
    assert exported["four_bit"]["bnb_4bit_quant_type"] == "nf4" and exported["merge_into"] == "nf4"
    assert exported["formats"] == ["merged"]
    assert exported["drift"]["rows"][0]["name"] == "merged into the dequantised NF4 base, fp32"
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "export")
    assert not hasattr(merged, "peft_config") and (output_dir / "export" / "tokenizer_config.json").is_file()

    evaluated = run(
        ROOT / "recipes" / "evaluate.py",
        "--model", tmp_path / "demo" / "base-model",
        "--adapter", output_dir,
        "--dataset", tmp_path / "demo" / "data" / "test.jsonl",
        "--split", "test", "--instruction", "", "--plain_prompts",
        "--max_problems", "8", "--max_new_tokens", "4", "--num_samples", "3", "--dtype", "float32",
        "--output", tmp_path / "eval.json",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["num_problems"] == 8 and 0.0 <= summary["pass@1"] <= 1.0 and "maj@3" in summary


@pytest.mark.slow  # a learning run
def test_quickstart_example_learns(tmp_path):
    """examples/quickstart.py, as the README quotes it: the mean reward climbs from about 0.1 to above 0.9."""
    import re

    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first, last = map(float, re.search(r"first 10 steps ([\d.]+) -> last 10 steps ([\d.]+)", run.stdout).groups())
    assert first < 0.3 and last > 0.8, (first, last)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow  # a tiny VLM's warm-up and 300 GRPO steps, ~40 s
def test_vision_demo_learns_to_name_shapes(tmp_path):
    """`make demo-vision`: a tiny Qwen2.5-VL warmed up on coloured shapes, its language model in 4-bit with LoRA,
    trained by GRPO on `shape_reward`: the training reward rises and so do both held-out scores, measured by the
    trainer's evaluation on images training never saw."""
    import re

    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "vision_demo.py"), "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first, last = map(
        float, re.search(r"training reward: first 25 steps ([\d.]+) -> last ([\d.]+)", run.stdout).groups()
    )
    held_out = {
        name: tuple(float(value) / 100 for value in values)
        for name, *values in re.findall(r"held-out (\w+) on 96 images: ([\d.]+)% before -> ([\d.]+)% after", run.stdout)
    }
    assert last > first + 0.05, (first, last)
    assert held_out["exact_answer"][1] > held_out["exact_answer"][0] + 0.05, held_out
    assert held_out["shape_reward"][1] > held_out["shape_reward"][0] + 0.1, held_out
    assert (tmp_path / "grpo" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # the recipe end to end, with images
def test_recipe_trains_a_vision_language_model_with_qlora(tmp_path):
    """The recipe on TRL's vision-language columns (a question, an `image`, an answer, from parquet files): the
    model folder's processor is loaded (its config has a vision tower), every prompt the rewards see carries its row's
    image (training and the held-out evaluation), the 4-bit run's LoRA adapter stays off the vision tower, and
    recipes/evaluate.py scores the adapter with the processor saved beside it, on the images."""
    from grpo_ext.testing import make_shape_splits, make_tiny_vlm

    model, processor = make_tiny_vlm("llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    for split, rows in zip(("train", "test"), make_shape_splits(num_train=16, num_test=4, image_size=28), strict=True):
        rows = rows.map(lambda row: {"question": row["prompt"][0]["content"]}, remove_columns=["prompt"])
        rows.to_parquet(tmp_path / f"{split}.parquet")
    # A reward that fails the run unless each prompt carries its row's image as an image part
    (tmp_path / "needs_images.py").write_text(
        "from grpo_ext.testing import shape_reward\n\n"
        "def shape_reward_on_images(prompts, completions, image, **kwargs):\n"
        "    for prompt, row_image in zip(prompts, image, strict=True):\n"
        "        parts = prompt[-1]['content']\n"
        "        assert row_image is not None and any(part['type'] == 'image' for part in parts), prompt\n"
        "    return shape_reward(completions, **kwargs)\n"
    )
    output_dir = tmp_path / "grpo"
    config = {
        "model_name_or_path": str(tmp_path / "model"),
        "dtype": "float32",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": "all-linear",
        "dataset_name": str(tmp_path / "train.parquet"),
        "dataset_test_name": str(tmp_path / "test.parquet"),
        "dataset_test_split": "test",
        "question_column": "question",
        "answer_column": "answer",
        "instruction": "",
        "reward_funcs": ["needs_images:shape_reward_on_images"],
        "eval_reward_funcs": ["needs_images:shape_reward_on_images"],
        "eval_task_metrics_only": True,
        "eval_before_training": True,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    trained = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "deepseek_math_style.py"), "--config", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "held-out pass@1 (needs_images:shape_reward_on_images)" in trained.stdout  # before -> after, measured
    # recipes/evaluate.py on the adapter: the processor saved beside it, the images in the prompts
    evaluated = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "evaluate.py"), "--model", str(tmp_path / "model"),
         "--adapter", str(output_dir), "--dataset", str(tmp_path / "test.parquet"), "--instruction", "",
         "--max_new_tokens", "4", "--reward_funcs", "needs_images:shape_reward_on_images",
         "--output", str(tmp_path / "evaluated.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "evaluated.json").read_text())["num_problems"] == 4
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["before"]["eval_task_problems"] == results["after"]["eval_task_problems"] == 4
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert "vision_tower" in str(adapter.get("exclude_modules"))  # the adapter stays on the language model
