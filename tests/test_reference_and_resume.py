"""Reference modes, and nothing trained is lost: SIGTERM saves a checkpoint, SIGKILL + resume matches a straight run."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from grpo_ext import GRPOExtTrainer
from grpo_ext.logprobs import completion_logps_and_entropies
from grpo_ext.reference import SNAPSHOT_ADAPTER
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, record_trained_batches

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _lora_trainer(tokenizer, make_args, **overrides):
    return GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(**overrides),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


def _reference_logps(trainer, batch):
    with trainer.reference.activate(trainer.model) as reference:
        return trainer._completion_logps(reference, batch)


def _policy_logps(trainer, batch):
    return trainer._completion_logps(trainer.model, batch)


def test_disabled_adapter_reference_is_the_base_model(tokenizer, make_args):
    trainer = _lora_trainer(tokenizer, make_args, max_steps=2)
    trained = record_trained_batches(trainer)
    trainer.train()
    _, batch = trained  # the second step's micro-batch
    base = make_tiny_model("qwen2", tokenizer)  # the same weights the adapter was put on
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    with torch.no_grad():
        expected, _ = completion_logps_and_entropies(base, ids, mask, batch.completion_ids.size(1))
    torch.testing.assert_close(_reference_logps(trainer, batch), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(_policy_logps(trainer, batch), expected)  # the policy itself did move


def test_snapshot_reference_follows_the_policy_at_each_sync_only(tokenizer, make_args):
    trainer = _lora_trainer(
        tokenizer, make_args, max_steps=2, ref_model_mode="snapshot_adapter", ref_model_sync_steps=2, beta=0.04
    )
    assert trainer.reference.mode == "snapshot_adapter"
    trained = record_trained_batches(trainer)
    trainer.train()  # synced at step 2, right after the last update
    _, batch = trained  # the second step's micro-batch
    torch.testing.assert_close(_reference_logps(trainer, batch), _policy_logps(trainer, batch))
    snapshot = _reference_logps(trainer, batch)
    with torch.no_grad():  # the policy moves on; the snapshot stays until the next sync
        for name, parameter in trainer.model.named_parameters():
            if "lora_B.default" in name:
                parameter.add_(0.5)
    assert not torch.allclose(_policy_logps(trainer, batch), snapshot)
    torch.testing.assert_close(_reference_logps(trainer, batch), snapshot)
    trainer.reference.sync(trainer.model)
    torch.testing.assert_close(_reference_logps(trainer, batch), _policy_logps(trainer, batch))
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if f".{SNAPSHOT_ADAPTER}." in n)
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if ".default." in n)


def test_no_reference_pass_without_kl(tokenizer, make_args, monkeypatch):
    trainer = _lora_trainer(tokenizer, make_args, max_steps=1, beta=0.0)
    assert trainer.reference.mode == "none"
    monkeypatch.setattr(
        type(trainer.reference), "activate", lambda *a: pytest.fail("a reference pass ran although no KL is on")
    )
    trained = record_trained_batches(trainer)
    trainer.train()
    (batch,) = trained
    assert batch.ref_per_token_logps is None


@pytest.mark.parametrize(
    "mode, peft, beta, message",
    [
        ("none", True, 0.04, "ref_model_mode='none' but a KL term needs pi_ref"),
        ("snapshot_adapter", False, 0.04, "needs a PEFT model"),
        ("disabled_adapter", False, 0.04, "needs a PEFT model"),
    ],
)
def test_impossible_reference_modes(tokenizer, make_args, mode, peft, beta, message):
    with pytest.raises(ValueError, match=message):
        GRPOExtTrainer(
            make_tiny_model("qwen2", tokenizer), digit_fraction_reward,
            args=make_args(ref_model_mode=mode, beta=beta), train_dataset=make_prompt_dataset(8),
            processing_class=tokenizer, peft_config=LoraConfig(**LORA) if peft else None,
        )  # fmt: skip


def test_reference_under_zero3_is_loaded_not_copied_and_snapshots_are_refused(tokenizer):
    """ZeRO-3 partitions weights at load: the copy is built by `load_copy`; adapter snapshots (in-place copies of
    partitioned tensors) are refused. The two-process ZeRO-3 runs are in tests/test_distributed.py."""
    from peft import get_peft_model

    from grpo_ext.reference import ReferencePolicy, load_reference_copy

    policy = make_tiny_model("qwen2", tokenizer)
    loaded = make_tiny_model("qwen2", tokenizer, seed=1)
    reference = ReferencePolicy.build(policy, "auto", load_copy=lambda: loaded, partitioned=True)
    assert reference.mode == "copy" and reference.model is loaded
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(ValueError, match="snapshot_adapter.*ZeRO-3.*disabled_adapter"):
        ReferencePolicy.build(get_peft_model(policy, LoraConfig(**LORA)), "snapshot_adapter", partitioned=True)
    with pytest.raises(ValueError, match="built in memory: pass the model as an id or path"):
        load_reference_copy("", {})


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, make_tokenizer

    output_dir, max_steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    args = GRPOExtConfig(
        output_dir=output_dir, per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        learning_rate=3e-2, lr_scheduler_type="constant", max_steps=max_steps, save_strategy="steps", save_steps=2,
        logging_steps=1, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], disable_tqdm=True,
        seed=0, beta=0.04, reward_kl_coef=1.0, ref_model_mode="snapshot_adapter", ref_model_sync_steps=2,
    )
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer), digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(16),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    class DumpSnapshot(TrainerCallback):  # what the reference is when training (re)starts
        def on_train_begin(self, args, state, control, **kwargs):
            weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".reference." in n}
            save_file(weights, output_dir + "/snapshot_at_start.safetensors")

    trainer.add_callback(DumpSnapshot())
    print("TRAINING", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(output_dir + "/final")
    print("INTERRUPTED" if trainer.interrupted else "FINISHED", trainer.state.global_step, flush=True)
    """
)


def _start(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path, process, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow  # a killed training process
def test_sigkill_then_resume_ends_with_the_same_adapter(tmp_path):
    """Same final adapter after SIGKILL + resume as without interruption (RNG, sampler, optimizer, rollout schedule),
    and the snapshot reference synced at step 2 is restored, not rebuilt from the initial adapter."""
    straight = _start(tmp_path, tmp_path / "straight", 4)
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0 and "FINISHED 4" in out, err[-3000:]

    killed = _start(tmp_path, tmp_path / "killed", 1000)
    _wait_for(tmp_path / "killed" / "checkpoint-2" / "trainer_state.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert (tmp_path / "killed" / "checkpoint-2" / SNAPSHOT_ADAPTER / "adapter_model.safetensors").exists()

    resumed = _start(tmp_path, tmp_path / "killed", 4, tmp_path / "killed" / "checkpoint-2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "FINISHED 4" in out, err[-3000:]

    snapshot = load_file(tmp_path / "killed" / "snapshot_at_start.safetensors")
    initial = load_file(tmp_path / "straight" / "snapshot_at_start.safetensors")
    assert any(not torch.equal(snapshot[k], initial[k]) for k in snapshot)  # synced at step 2, not the initial one
    saved = load_file(tmp_path / "killed" / "checkpoint-2" / SNAPSHOT_ADAPTER / "adapter_model.safetensors")
    assert sorted(v.sum().item() for v in saved.values()) == pytest.approx(
        sorted(v.sum().item() for v in snapshot.values())
    )

    expected = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    moved = max((expected[k] - load_file(tmp_path / "straight" / "checkpoint-2" / "adapter_model.safetensors")[k])
                .abs().max().item() for k in expected)  # fmt: skip
    assert moved > 1e-4  # steps 3 and 4 changed the adapter, so the comparison below means something
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow  # a signalled training process
def test_sigterm_saves_a_loadable_checkpoint(tmp_path, tokenizer):
    process = _start(tmp_path, tmp_path / "run", 100000)
    _wait_for(tmp_path / "run" / "checkpoint-2" / "trainer_state.json", process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "SIGTERM: saving a checkpoint" in out and "INTERRUPTED" in out
    step = int(out.split("INTERRUPTED")[1].split()[0])
    checkpoint = tmp_path / "run" / f"checkpoint-{step}"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()
    model = PeftModel.from_pretrained(make_tiny_model("qwen2", tokenizer), checkpoint)
    assert any("lora_B" in name and p.abs().max() > 0 for name, p in model.named_parameters())
