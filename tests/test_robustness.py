"""Faults a user meets: NaN / infinite rewards, NaN weights, interrupted saves, a full disk, a resume with other
settings, signal handlers left behind, uploads that fail, tokens written to disk."""

import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from grpo_ext import GRPOExtTrainer
from grpo_ext.rewards import RewardFunctionError
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model


def _trainer(tokenizer, args, reward_funcs=digit_fraction_reward, dataset=None, **kwargs):
    return GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        reward_funcs,
        args=args,
        train_dataset=dataset if dataset is not None else make_prompt_dataset(8),
        processing_class=tokenizer,
        **kwargs,
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
