"""Faults a user meets: NaN / infinite rewards, NaN weights, interrupted saves, a full disk, a resume with other
settings, signal handlers left behind, uploads that fail, tokens written to disk."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import transformers.trainer
import yaml
from conftest import tiny_trainer as _trainer
from huggingface_hub import RepoUrl
from peft import LoraConfig
from transformers import TrainerCallback

import grpo_ext.hub as hub
from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.checkpoints import NoSpaceLeftError
from grpo_ext.hub import HubPushError
from grpo_ext.reward_scoring import RewardFunctionError
from grpo_ext.testing import (
    digit_fraction_reward,
    make_arithmetic_splits,
    make_prompt_dataset,
    save_tiny_model,
)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def inf_on_first_row(completions, **kwargs):
    return [math.inf] + [0.0] * (len(completions) - 1)


# --- 1. Non-finite rewards and weights ---


def test_an_infinite_reward_stops_the_step_it_appears_in_and_nothing_is_saved(tokenizer, make_args):
    args = make_args(scale_rewards="none", save_strategy="steps", save_steps=1)
    trainer = _trainer(tokenizer, args, reward_funcs=[digit_fraction_reward, inf_on_first_row])
    before = _weights(trainer)
    with pytest.raises(RewardFunctionError, match=r"'inf_on_first_row' returned inf on row 0 .*1 non-finite"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in _weights(trainer).items())
    assert not list(Path(args.output_dir).glob("checkpoint-*"))


def test_dropped_infinite_rewards_train_finite_weights_and_are_logged(tokenizer, make_args):
    args = make_args(scale_rewards="none", nonfinite_rewards="drop", max_steps=2)
    trainer = _trainer(tokenizer, args, reward_funcs=[digit_fraction_reward, inf_on_first_row])
    trainer.train()
    assert all(torch.isfinite(p).all() for p in _weights(trainer).values())
    logged = [entry for entry in trainer.state.log_history if "rewards/inf_on_first_row/nonfinite" in entry]
    assert [entry["rewards/inf_on_first_row/nonfinite"] for entry in logged] == [1.0, 1.0]
    assert all(entry["rewards/digit_fraction_reward/nonfinite"] == 0.0 for entry in logged)
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_a_nan_loss_stops_before_the_optimizer_step(tokenizer, make_args, monkeypatch):
    import grpo_ext.trainer as trainer_module

    aggregate = trainer_module.aggregate_loss
    monkeypatch.setattr(trainer_module, "aggregate_loss", lambda *a, **k: aggregate(*a, **k) * math.nan)
    trainer = _trainer(tokenizer, make_args())
    before = _weights(trainer)
    with pytest.raises(FloatingPointError, match=r"loss of step 1 is nan.*stopped before the optimizer step"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in _weights(trainer).items())


class PoisonAtStep(TrainerCallback):
    """Turn one trainable weight into NaN at the end of a step, as a diverging update would."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in self.trainer.model.parameters() if p.requires_grad).fill_(math.nan)


def test_nan_weights_are_never_checkpointed_and_the_step_is_named(tokenizer, make_args):
    args = make_args(max_steps=3, save_strategy="steps", save_steps=1)
    trainer = _trainer(tokenizer, args)
    trainer.add_callback(PoisonAtStep(trainer, step=2))
    with pytest.raises(FloatingPointError, match=r"NaN / infinite .* after step 2.*finite after step 1, so step 2"):
        trainer.train()
    out = Path(args.output_dir)
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-2").exists()
    with pytest.raises(FloatingPointError, match=r"Refusing to save checkpoint-2"):
        trainer._save_checkpoint(trainer.model, None)
    assert not (out / "checkpoint-2").exists()


def test_the_completions_table_shows_what_was_generated_whatever_a_reward_function_changes(
    tokenizer, make_args, capsys
):
    def vandal(prompts, completions, **kwargs):
        for prompt, completion in zip(prompts, completions):
            prompt[-1]["content"] = "VANDALISED"
            completion[-1]["content"] = "VANDALISED"
        return [0.0] * len(prompts)

    args = make_args(max_steps=1, log_completions=True)
    trainer = _trainer(
        tokenizer,
        args,
        reward_funcs=[vandal, digit_fraction_reward],
        dataset=make_prompt_dataset(8, conversational=True),
    )
    trainer.train()
    out = capsys.readouterr().out
    assert "step 1 completions:" in out and "+" in out and "VANDALISED" not in out


# --- 3 and 6. Resume: complete checkpoints only, same settings; a full disk named ---


def _checkpointed_run(tokenizer, make_args, steps=2, **overrides):
    """A finished run with checkpoint-1 .. checkpoint-<steps> in its output folder."""
    args = make_args(max_steps=steps, save_strategy="steps", save_steps=1, **overrides)
    _trainer(tokenizer, args).train()
    return Path(args.output_dir)


def test_resume_skips_checkpoints_a_killed_save_left_incomplete(tokenizer, make_args):
    out = _checkpointed_run(tokenizer, make_args)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").unlink()  # killed before the trainer state was written
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-10")
    state = out / "checkpoint-10" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while writing it
    (out / "checkpoint-11").mkdir()  # killed right after creating the folder

    trainer = _trainer(tokenizer, make_args(max_steps=3, save_strategy="steps", save_steps=1))
    with pytest.warns(UserWarning) as caught:
        trainer.train(resume_from_checkpoint=True)
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    assert [s.split(" on resume")[0] for s in skipped] == [
        f"Skipping {out / name}" for name in ("checkpoint-11", "checkpoint-10", "checkpoint-3")
    ]
    assert "no trainer_state.json" in skipped[2] and "unreadable" in skipped[1] and "incomplete" in skipped[0]
    assert trainer.state.global_step == 3  # resumed at step 2, trained one more step
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]


def test_resume_with_no_complete_checkpoint_says_so(tokenizer, make_args):
    args = make_args()
    (Path(args.output_dir) / "checkpoint-5").mkdir(parents=True)
    with pytest.warns(UserWarning, match="Skipping"), pytest.raises(ValueError, match="no complete checkpoint-N"):
        _trainer(tokenizer, args).train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_generations=2), r"num_generations=4 there, 2 here"),
        (dict(loss_type="dapo"), r"loss_type='grpo' there, 'dapo' here"),
    ],
)
def test_resume_with_other_group_size_or_loss_type_is_refused(tokenizer, make_args, change, message):
    out = _checkpointed_run(tokenizer, make_args, steps=1)
    trainer = _trainer(tokenizer, make_args(max_steps=2, **change))
    with pytest.raises(ValueError, match=rf"Cannot resume from {out / 'checkpoint-1'}: .*{message}"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_from_another_model_path_is_warned_about(tokenizer, make_args, tmp_path):
    first, second = save_tiny_model(tmp_path / "first"), save_tiny_model(tmp_path / "second")
    args = make_args(max_steps=1, save_strategy="steps", save_steps=1)
    GRPOExtTrainer(first, digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8)).train()
    trainer = GRPOExtTrainer(
        second, digit_fraction_reward, args=make_args(max_steps=2), train_dataset=make_prompt_dataset(8)
    )
    with pytest.warns(UserWarning, match=rf"trained from model='{first}', with model='{second}'"):
        trainer.train(resume_from_checkpoint="true")  # as the recipe's --resume_from_checkpoint true gives it
    assert trainer.state.global_step == 2


def test_a_full_disk_while_saving_names_the_folder(tokenizer, make_args, monkeypatch):
    args = make_args(max_steps=1, save_strategy="steps", save_steps=1)
    trainer = _trainer(tokenizer, args)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", disk_full)
    folder = Path(args.output_dir) / "checkpoint-1"
    with pytest.raises(NoSpaceLeftError, match=rf"no space left on device while saving {folder}") as caught:
        trainer.train()
    assert caught.value.errno == errno.ENOSPC and "save_total_limit" in str(caught.value)

    monkeypatch.setattr(trainer, "_save", disk_full)
    with pytest.raises(NoSpaceLeftError, match=rf"no space left on device while saving {args.output_dir}/final"):
        trainer.save_model(f"{args.output_dir}/final")


# --- 4. Signal handlers ---


def test_signal_handlers_are_restored_when_train_raises(tokenizer, make_args):
    def fails(completions, **kwargs):
        raise RuntimeError("boom")

    def mine(signum, frame):
        pass

    previous = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(RewardFunctionError, match="boom"):
            _trainer(tokenizer, make_args(), reward_funcs=fails).train()
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
        _trainer(tokenizer, make_args(max_steps=1)).train()
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- 2. No token in any file the trainer writes ---

FAKE_TOKEN = "hf_FAKEtoken1234567890"
FAKE_ENV_TOKEN = "hf_FAKEenvToken0987654321"


class OfflineHub:
    """Stands in for the Hub: records what would be uploaded (file bytes), creates repositories without a network."""

    def __init__(self):
        self.uploaded = {}  # path -> bytes

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            data = op.path_or_fileobj
            self.uploaded[f"{repo_id}:{op.path_in_repo}"] = data if isinstance(data, bytes) else Path(data).read_bytes()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                self.uploaded[f"{repo_id}:{path.relative_to(folder_path)}"] = path.read_bytes()
        future = Future()
        future.set_result(None)
        return future


def _files_holding(folder: Path, tokens: list[str]) -> list[str]:
    """Every file under `folder` (binary ones too, read as bytes) that contains one of `tokens`."""
    return [
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and any(token.encode() in path.read_bytes() for token in tokens)
    ]


@pytest.mark.parametrize("adapter", [True, False], ids=["lora", "full"])
def test_no_token_in_any_file_log_card_or_upload(tmp_path, make_args, monkeypatch, capfd, caplog, adapter):
    hub_api = OfflineHub()
    monkeypatch.setattr(hub, "HfApi", lambda *a, **k: hub_api)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub_api)
    monkeypatch.setenv("HF_TOKEN", FAKE_ENV_TOKEN)
    args = make_args(
        max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True, hub_model_id="someone/tiny",
        hub_token=FAKE_TOKEN, model_init_kwargs={"token": FAKE_TOKEN}, logging_steps=1, log_completions=True,
    )  # fmt: skip
    trainer = GRPOExtTrainer(
        save_tiny_model(tmp_path / "base"), digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if adapter else None,
    )  # fmt: skip
    with caplog.at_level("DEBUG"):
        trainer.train()
        trainer.save_model()
        trainer.save_state()
        trainer.push_to_hub(dataset_name="synthetic/sums")
    out = Path(args.output_dir)
    assert (out / "checkpoint-2" / "training_args.bin").is_file() and (out / "training_args.bin").is_file()
    assert _files_holding(out, [FAKE_TOKEN, FAKE_ENV_TOKEN]) == []
    assert hub_api.uploaded and not [p for p, data in hub_api.uploaded.items() if FAKE_TOKEN.encode() in data]
    logs = capfd.readouterr()
    assert FAKE_TOKEN not in logs.out + logs.err + caplog.text and FAKE_ENV_TOKEN not in logs.out + logs.err
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.model_init_kwargs == {} and saved.num_generations == 4
    assert trainer.args.hub_token == FAKE_TOKEN  # the live config keeps it for the pushes


@pytest.mark.slow  # the recipe end to end
def test_no_token_in_any_file_the_recipe_writes(tmp_path):
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_arithmetic_splits(num_test=10)[0].select(range(8))))
    config = {
        "model_name_or_path": save_tiny_model(tmp_path / "base"), "dtype": "float32", "use_peft": True, "lora_r": 4,
        "lora_target_modules": ["q_proj", "v_proj"], "dataset_name": str(data), "dataset_config": None,
        "dataset_test_split": None, "instruction": "", "conversational": False, "reward_funcs": ["accuracy"],
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "num_generations": 4,
        "max_completion_length": 4, "max_steps": 2, "save_strategy": "steps", "save_steps": 1, "logging_steps": 1,
        "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
        "hub_token": FAKE_TOKEN,
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_TOKEN": FAKE_ENV_TOKEN, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, str(root / "recipes" / "deepseek_math_style.py"), "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "training_args.bin").is_file() and (out / "resolved_config.yaml").is_file()
    assert _files_holding(out, [FAKE_TOKEN, FAKE_ENV_TOKEN]) == []
    assert FAKE_TOKEN not in run.stdout + run.stderr and FAKE_ENV_TOKEN not in run.stdout + run.stderr


# --- 5. Uploads during training ---


def test_failing_checkpoint_uploads_neither_block_nor_stop_training(tokenizer, make_args, monkeypatch, caplog):
    import grpo_ext.hub_trainer as hub_trainer_module

    attempts = []

    def unreachable_hub(folder, repo_id, **kwargs):
        attempts.append((Path(folder).name, threading.current_thread() is threading.main_thread()))
        raise ConnectionError("Hub unreachable")

    class NoNetwork:
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("Hub unreachable")

    monkeypatch.setattr(hub_trainer_module, "push_adapter_to_hub", unreachable_hub)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: NoNetwork())
    args = make_args(
        max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True, hub_model_id="someone/tiny",
        hub_always_push=True,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        trainer = _trainer(tokenizer, args, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer.train()
    assert trainer.state.global_step == 2
    # each checkpoint uploaded off the training thread, the newest retried once at the end of training
    assert attempts == [("checkpoint-1", False), ("checkpoint-2", False), ("checkpoint-2", True)]
    assert "Could not create or reach the Hub repository someone/tiny" in caplog.text
    assert f"Uploading {Path(args.output_dir) / 'checkpoint-1'} to the Hub failed (ConnectionError" in caplog.text
    assert "Retrying the upload of" in caplog.text and "intact on disk" in caplog.text

    with pytest.raises(HubPushError, match=r"someone/tiny failed \(ConnectionError: Hub unreachable\).*intact in"):
        trainer.push_to_hub()
    out = Path(args.output_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()


# --- 8. Recipe YAML value types ---


def _recipe_script_arguments():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "deepseek_math_style.py"
    spec = importlib.util.spec_from_file_location("deepseek_math_style", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScriptArguments


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml")))
def test_every_recipe_config_has_values_of_the_right_types(config):
    from trl import ModelConfig

    from grpo_ext.recipe import check_config_file_types

    check_config_file_types(["--config", str(config)], (_recipe_script_arguments(), GRPOExtConfig, ModelConfig))


def test_recipe_refuses_a_wrongly_typed_yaml_before_loading_the_model(tmp_path):
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "recipes" / "configs" / "tiny-cpu.yaml").read_text())
    config.update(max_steps=1.5, model_name_or_path=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "out"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, str(root / "recipes" / "deepseek_math_style.py"), "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert run.returncode != 0
    assert "TypeError" in run.stderr and "max_steps is 1.5 (float), but max_steps takes int" in run.stderr
    assert "no-such-model" not in run.stderr  # stopped before the model was looked for
