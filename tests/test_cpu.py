"""First contact on a CPU (`grpo_ext.cpu`): `dtype="auto"` is float32 on a CPU without native bf16 / fp16 kernels in
every loading path, torch's threads follow the cores this process may use, a training step raises no deprecation
warning from grpo-ext's own calls, and `import grpo_ext` stays light."""

import importlib.util
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from grpo_ext import cpu
from grpo_ext.models import load_causal_lm, prepare_policy, unwrap_causal_lm
from grpo_ext.plan import settings_from_config
from grpo_ext.reference import load_reference_copy
from grpo_ext.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(cpu, "_SAID", set())  # each test sees the once-only log lines afresh


def pretend_cpu(monkeypatch, bf16: bool, fp16: bool = False) -> None:
    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: bf16)
    monkeypatch.setattr(cpu, "cpu_has_fast_fp16", lambda: fp16)


@pytest.fixture
def bf16_checkpoint(tmp_path, tokenizer):
    path = tmp_path / "bf16-model"
    make_tiny_model("qwen2", tokenizer).to(torch.bfloat16).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return str(path)


# --- dtype ---


@pytest.mark.parametrize(
    "fast_bf16, fast_fp16, checkpoint, expected",
    [
        (False, False, "bfloat16", "float32"),
        (False, False, None, "float32"),  # unknown: counted as bf16
        (False, False, "float32", "auto"),  # nothing to gain
        (True, False, "bfloat16", "auto"),  # native bf16: the checkpoint's dtype is fine
        (True, False, "float16", "float32"),  # bf16 kernels do not make fp16 fast
        (True, True, "float16", "auto"),
        (False, False, torch.bfloat16, "float32"),
    ],
)
def test_auto_means_float32_on_a_cpu_without_half_kernels(monkeypatch, fast_bf16, fast_fp16, checkpoint, expected):
    pretend_cpu(monkeypatch, fast_bf16, fast_fp16)
    assert cpu.cpu_dtype("auto", checkpoint) == expected


def test_dtype_notes_are_said_once_and_explicit_bf16_is_kept(monkeypatch, caplog):
    pretend_cpu(monkeypatch, bf16=False)
    with caplog.at_level(logging.INFO, logger="grpo_ext"):
        for _ in range(3):
            assert cpu.cpu_dtype("auto", "bfloat16") == "float32"
            assert cpu.cpu_dtype(torch.bfloat16) is torch.bfloat16  # honoured, with a warning
            assert cpu.cpu_dtype(torch.float32) is torch.float32
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "loading in float32 instead" in messages[0]
    assert "without native bfloat16 support" in messages[1]


@pytest.mark.parametrize("fast_bf16, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_load_causal_lm_auto_on_the_cpu(monkeypatch, bf16_checkpoint, fast_bf16, expected):
    pretend_cpu(monkeypatch, fast_bf16)
    assert load_causal_lm(bf16_checkpoint, {"dtype": "auto"}, on_cpu=True).dtype == expected
    assert load_causal_lm(bf16_checkpoint, {"dtype": "bfloat16"}, on_cpu=True).dtype == torch.bfloat16
    assert load_causal_lm(bf16_checkpoint, {"dtype": "auto"}, on_cpu=False).dtype == torch.bfloat16  # a GPU's


def test_training_loads_auto_in_float32_on_a_slow_cpu(monkeypatch, bf16_checkpoint, make_args, tokenizer):
    pretend_cpu(monkeypatch, bf16=False)
    model, _, _ = prepare_policy(bf16_checkpoint, make_args(model_init_kwargs={"dtype": "auto"}), tokenizer)
    assert model.dtype == torch.float32
    model, _, _ = prepare_policy(bf16_checkpoint, make_args(model_init_kwargs={"dtype": "bfloat16"}), tokenizer)
    assert model.dtype == torch.bfloat16  # an explicit request is honoured
    reference = load_reference_copy(bf16_checkpoint, {"dtype": "auto"}, on_cpu=True)  # ZeRO-3's frozen copy
    assert reference.dtype == torch.float32


def test_evaluate_py_loads_auto_in_float32_on_a_slow_cpu(monkeypatch, bf16_checkpoint):
    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pretend_cpu(monkeypatch, bf16=False)
    assert evaluate.load_model(bf16_checkpoint).dtype == torch.float32  # --dtype auto, the default
    assert evaluate.load_model(bf16_checkpoint, dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize("fast_bf16, cpu_bytes", [(False, 4), (True, 2)])
def test_planner_counts_auto_as_float32_on_a_slow_cpu(monkeypatch, fast_bf16, cpu_bytes):
    pretend_cpu(monkeypatch, fast_bf16)
    values = {"dtype": "auto", "bf16": False}
    assert settings_from_config({**values, "use_cpu": True}, checkpoint_dtype="bfloat16").dtype_bytes == cpu_bytes
    assert settings_from_config(values, checkpoint_dtype="bfloat16").dtype_bytes == 2  # a GPU keeps bf16


# --- threads ---


@pytest.fixture
def no_thread_settings(monkeypatch):
    for name in (cpu.NUM_THREADS_ENV, "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)


def test_threads_follow_the_affinity_mask(monkeypatch, no_thread_settings):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert cpu.num_threads()[0] == 3
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 1.5)  # docker --cpus 1.5: one whole core
    assert cpu.num_threads()[0] == 1
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three processes of a launch share the three cores
    assert cpu.num_threads()[0] == 1


def test_thread_overrides(monkeypatch, no_thread_settings):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu.num_threads() == (2, "OMP_NUM_THREADS=2")
    monkeypatch.setenv(cpu.NUM_THREADS_ENV, "5")  # grpo-ext's own override wins
    assert cpu.num_threads() == (5, f"{cpu.NUM_THREADS_ENV}=5")
    monkeypatch.setenv(cpu.NUM_THREADS_ENV, "many")
    with pytest.raises(ValueError, match=f"{cpu.NUM_THREADS_ENV}='many' must be a whole number"):
        cpu.num_threads()


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) is None


def test_set_torch_threads_sets_and_says_once(monkeypatch, no_thread_settings, caplog):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="grpo_ext"):
            assert cpu.set_torch_threads() == 1
            cpu.set_torch_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert [r.getMessage() for r in caplog.records] == [
        f"torch uses 1 CPU thread (the cores this process may use; override with {cpu.NUM_THREADS_ENV}=N)."
    ]


# --- no deprecation warnings from grpo-ext's own calls ---


@pytest.mark.parametrize("lora", [False, True])
def test_a_training_step_raises_no_future_warning(monkeypatch, tokenizer, make_args, lora):
    import grpo_ext.engine as engine_module
    from grpo_ext import GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset

    checkpointing_during_generation = []
    generate = engine_module.generate_completions

    def spy(model, *args, **kwargs):
        checkpointing_during_generation.append(unwrap_causal_lm(model).is_activation_checkpointing)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(engine_module, "generate_completions", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = make_args(gradient_checkpointing=True, max_steps=2, num_iterations=2)  # TRL's field name
        trainer = GRPOExtTrainer(
            make_tiny_model("qwen2", tokenizer),
            digit_fraction_reward,
            args=args,
            train_dataset=make_prompt_dataset(8),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0) if lora else None,
        )
        trainer.train()
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
    assert checkpointing_during_generation == [False]  # off for generation (one rollout, two iterations)
    assert unwrap_causal_lm(trainer.model).is_activation_checkpointing  # and back on for training
    assert trainer.state.log_history[0]["kl"] == 0.0  # the step ran and logged


# --- a light import ---


def test_import_grpo_ext_loads_neither_the_trainer_nor_transformers():
    code = (
        "import sys, grpo_ext, grpo_ext.plan, grpo_ext.cpu; "
        "print(sorted(m for m in ('grpo_ext.trainer', 'grpo_ext.config', 'transformers', 'trl', 'torch') "
        "if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]"
    import grpo_ext

    assert grpo_ext.GRPOExtConfig.__name__ == "GRPOExtConfig"  # loaded on first use
    assert "GRPOExtTrainer" in dir(grpo_ext)
