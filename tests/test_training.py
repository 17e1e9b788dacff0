"""Short training runs on tiny models: full, LoRA, 4-bit QLoRA, conversational, several reward kinds."""

import asyncio
import json

import pytest
import torch
from peft import LoraConfig

from grpo_ext import GRPOExtTrainer
from grpo_ext.checkpoints import STATE_FILE
from grpo_ext.testing import (
    TINY_ARCHITECTURES,
    digit_fraction_reward,
    make_prompt_dataset,
    make_tiny_model,
    record_trained_batches,
    save_tiny_model,
    save_tiny_reward_model,
)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_full_model_trains_against_a_frozen_copy(tokenizer, make_args, architecture):
    model = make_tiny_model(architecture, tokenizer)
    trainer = GRPOExtTrainer(
        model, digit_fraction_reward, args=make_args(), train_dataset=make_prompt_dataset(8), processing_class=tokenizer
    )
    assert trainer.reference.mode == "copy"
    reference_before = _snapshot(trainer.reference.model)
    before = _snapshot(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model) == set(before)  # every parameter moved
    assert not _changed(reference_before, trainer.reference.model)  # pi_ref stayed frozen
    logged = trainer.state.log_history[0]
    for key in ("reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length"):
        assert key in logged, key


def test_lora_trains_only_the_adapter_with_no_reference_copy(tokenizer, make_args):
    trainer = GRPOExtTrainer(
        make_tiny_model("llama", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=3),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.reference.mode == "disabled_adapter" and trainer.reference.model is None
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed) and any("lora_A" in name for name in changed)
    assert "kl" in trainer.state.log_history[-2]


def test_lora_on_lm_head_is_scored_through_the_adapter(tokenizer, make_args):
    """The chunked log-probs go through the LoRA lm_head, so its adapter learns and matches the full forward."""
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=3),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["lm_head", "q_proj"], lora_dropout=0.0),
    )
    before = _snapshot(trainer.model)
    trained = record_trained_batches(trainer)
    trainer.train()
    assert any("lm_head.lora_B" in name for name in _changed(before, trainer.model))
    batch = trained[-1]  # the last step's micro-batch
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    logits = trainer.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)
    ).logits[:, -input_ids.size(1) + batch.prompt_ids.size(1) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    expected = expected * batch.completion_mask
    torch.testing.assert_close(trainer._completion_logps(trainer.model, batch), expected, atol=1e-5, rtol=1e-5)


def test_qlora_4bit_on_cpu_with_gradient_checkpointing(tmp_path, tokenizer, make_args):
    pytest.importorskip("bitsandbytes")
    from grpo_ext.models import four_bit_config

    trainer = GRPOExtTrainer(
        save_tiny_model(tmp_path / "model"),
        digit_fraction_reward,
        args=make_args(max_steps=2, gradient_checkpointing=True),  # as the QLoRA recipes run
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
        quantization_config=four_bit_config(torch.float32),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.model.is_loaded_in_4bit
    assert trainer.reference.mode == "disabled_adapter"
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in name for name in changed)


def test_4bit_weights_keep_their_trainable_layout_after_a_no_grad_pass(tmp_path):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel after an eval-mode no-grad pass on CPUs with
    AVX512-BF16; training through the repacked weight then fails. The flag is forced on here, so the check is the same
    on every CPU: with the guard the weights keep their layout and LoRA below a 4-bit layer still gets gradients."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grpo_ext.models import four_bit_config, keep_4bit_weights_trainable

    path = save_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128)  # a whole 64-wide block
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=four_bit_config(torch.float32))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers, "no bitsandbytes Linear4bit layer found"
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
    model = get_peft_model(keep_4bit_weights_trainable(model), LoraConfig(r=4, target_modules=["q_proj"]))
    input_ids = torch.randint(4, 80, (2, 6))
    model.eval()
    with torch.no_grad():
        model(input_ids)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    model.train()
    model(input_ids).logits.sum().backward()
    gradient = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


@pytest.mark.parametrize("gather", [True, False])
def test_ds3_gather_for_generation_reaches_the_unwrapping(tokenizer, make_args, monkeypatch, gather):
    """The flag decides whether ZeRO-3 gathers the whole policy for generation (tests/test_distributed.py runs both
    under two processes); here: the trainer hands it to the unwrapping (models.unwrapped_for_generation)."""
    import grpo_ext.trainer as trainer_module

    seen = []
    unwrap = trainer_module.unwrapped_for_generation

    def recording_unwrap(*args, **kwargs):
        seen.append(kwargs["gather_deepspeed3_params"])
        return unwrap(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "unwrapped_for_generation", recording_unwrap)
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=1, ds3_gather_for_generation=gather),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    assert seen == [gather]


def test_conversational_prompts_and_weighted_rewards(tokenizer, make_args):
    seen = {}

    def length_reward(completions, **kwargs):
        seen["completion"] = completions[0]
        return [float(len(c[0]["content"])) for c in completions]

    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        [digit_fraction_reward, length_reward],
        args=make_args(reward_weights=[1.0, 0.5], max_steps=1),
        train_dataset=make_prompt_dataset(8, conversational=True),
        processing_class=tokenizer,
    )
    trainer.train()
    assert isinstance(seen["completion"], list) and seen["completion"][0]["role"] == "assistant"
    logged = trainer.state.log_history[0]
    expected = logged["rewards/digit_fraction_reward/mean"] + 0.5 * logged["rewards/length_reward/mean"]
    assert logged["reward"] == pytest.approx(expected, rel=1e-5)


def test_async_reward_and_reward_model_from_a_local_path(tmp_path, tokenizer, make_args):
    async def async_digit_reward(completions, **kwargs):
        await asyncio.sleep(0)
        return digit_fraction_reward(completions)

    reward_model_path = save_tiny_reward_model(tmp_path / "reward_model")
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        [async_digit_reward, reward_model_path],
        args=make_args(max_steps=1),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer.rewards.names == ["async_digit_reward", "reward_model"]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert 0.0 <= logged["rewards/async_digit_reward/mean"] <= 1.0
    assert logged["rewards/reward_model/std"] > 0  # the reward model scored each completion differently


def test_old_log_probs_when_the_policy_moves_during_a_rollout(tokenizer, make_args):
    """num_iterations=2 reuses each rollout for a second update, which needs pi_old."""
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(num_iterations=2, max_steps=2, beta=0.0),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer.reference.mode == "none"
    trained = record_trained_batches(trainer)
    trainer.train()
    batch, _ = trained  # one rollout, trained twice (num_iterations=2)
    assert batch.old_per_token_logps is not None and batch.ref_per_token_logps is None
    # The second pass saw a moved policy: its ratios differ from 1 somewhere
    now = trainer._completion_logps(trainer.model, batch)
    assert (now - batch.old_per_token_logps).abs().max() > 0


def test_evaluation_logs_eval_metrics(tokenizer, make_args):
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=1, per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=1),
        train_dataset=make_prompt_dataset(8),
        eval_dataset=make_prompt_dataset(8, seed=1),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    logged = trainer.state.log_history[-1]  # as in TRL, the GRPO metrics go to the log, the loss to both
    assert "eval_loss" in metrics and "eval_loss" in logged
    assert {"eval_reward", "eval_kl", "eval_entropy", "eval_completions/mean_length"} <= set(logged)


def test_checkpoint_holds_the_adapter_and_training_resumes(tmp_path, tokenizer, make_args, capsys):
    args = make_args(max_steps=2, save_strategy="steps", save_steps=1, log_completions=True, num_completions_to_print=2)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    dataset = make_prompt_dataset(8)
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    assert "step 1 completions:" in capsys.readouterr().out  # log_completions prints a sample

    resumed = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2


def test_same_seed_same_completions_in_a_rerun(tmp_path, tokenizer, make_args):
    model_path = save_tiny_model(tmp_path / "model")

    def rollout(seed):
        trainer = GRPOExtTrainer(
            model_path, digit_fraction_reward, args=make_args(max_steps=1, seed=seed),
            train_dataset=make_prompt_dataset(8), processing_class=tokenizer,
        )  # fmt: skip
        trained = record_trained_batches(trainer)
        trainer.train()
        (batch,) = trained
        return batch.completion_ids

    first, again, other = rollout(0), rollout(0), rollout(1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.shape != other.shape or not torch.equal(first, other)


def test_adaptive_entropy_coefficient_moves_and_resumes(tmp_path, tokenizer, make_args):
    """use_adaptive_entropy: a target above the model's entropy raises the coefficient each step, logged as
    `entropy_coef`, and saved in the checkpoint."""
    settings = dict(
        use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.01, entropy_target=100.0, beta=0.0
    )
    dataset = make_prompt_dataset(8)
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=2, save_strategy="steps", save_steps=1, **settings),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry["entropy_coef"] for entry in trainer.state.log_history if "entropy_coef" in entry]
    assert logged == pytest.approx([0.02, 0.03])
    assert all("policy_loss" in entry for entry in trainer.state.log_history[:-1])
    with open(tmp_path / "out" / "checkpoint-1" / STATE_FILE) as file:  # what resume restores
        saved = json.load(file)["entropy_control"]
    assert saved["coef"] == pytest.approx(0.02) and saved["last_entropy"] < 100


def test_dataloader_workers_can_pickle_the_collator(tokenizer, make_args):
    """Worker processes started with spawn receive the collator pickled: it must not be a local lambda."""
    import pickle

    from conftest import tiny_trainer

    trainer = tiny_trainer(tokenizer, make_args(dataloader_num_workers=1))
    rows = [{"prompt": "1+2=", "answer": "3"}]
    assert pickle.loads(pickle.dumps(trainer.data_collator))(rows) == rows
