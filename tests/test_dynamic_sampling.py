"""DAPO's dynamic sampling: only groups whose rewards vary are trained on, within max_sampling_rounds."""

import pytest
import torch

from grpo_ext import GRPOExtTrainer
from grpo_ext.rollout import Rollout, varying_groups
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, record_trained_batches


def test_varying_groups():
    std = torch.tensor([0.0, 0.0, 0.5, 0.5, float("nan"), float("nan")])
    assert varying_groups(std, 2).tolist() == [False, True, False]


def _rollout(prompt_ids, completion_ids, advantage):
    prompt_ids, completion_ids = torch.tensor(prompt_ids), torch.tensor(completion_ids)
    return Rollout(
        prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids),
        advantages=torch.tensor([advantage]),
    )  # fmt: skip


def test_concat_rollouts_pads_prompts_left_and_completions_right():
    merged = Rollout.concat([_rollout([[7, 8]], [[1, 2, 3]], 1.0), _rollout([[5, 6, 7]], [[4]], 0.0)])
    assert merged.prompt_ids.tolist() == [[0, 7, 8], [5, 6, 7]]
    assert merged.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert merged.completion_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert merged.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert merged.advantages.tolist() == [1.0, 0.0]
    assert merged.ref_per_token_logps is None  # fields a rollout does not have stay absent


def test_rollout_rows_and_split_slice_every_tensor():
    rollout = Rollout.concat([_rollout([[i]], [[i, i]], float(i)) for i in range(4)])
    halves = rollout.split(2)
    assert [h.advantages.tolist() for h in halves] == [[0.0, 1.0], [2.0, 3.0]]
    assert halves[1].completion_ids.tolist() == [[2, 2], [3, 3]] and halves[1].prompt_ids.tolist() == [[2], [3]]
    assert len(rollout.rows(1, 3)) == 2 and rollout.rows(1, 3).prompt_mask.tolist() == [[1], [1]]


def _constant_for_odd_answers(completions, answer, **kwargs):
    """Rewards vary within a group only for prompts whose answer is even: odd-answer groups carry no signal."""
    return [digit_fraction_reward([c])[0] if int(a) % 2 == 0 else 0.5 for c, a in zip(completions, answer)]


def _trainer(tokenizer, make_args, reward, **overrides):
    return GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer), reward, args=make_args(dynamic_sampling=True, **overrides),
        train_dataset=make_prompt_dataset(32), processing_class=tokenizer,
    )  # fmt: skip


def test_only_groups_with_varying_rewards_are_trained_on(tokenizer, make_args):
    trainer = _trainer(tokenizer, make_args, _constant_for_odd_answers, max_steps=2, max_sampling_rounds=8)
    trained = record_trained_batches(trainer)
    trainer.train()
    _, batch = trained  # the second rollout's micro-batch
    advantages = batch.advantages.view(-1, 4)  # (groups, G)
    assert (advantages.abs().sum(1) > 0).all()  # every trained group has signal
    logged = trainer.state.log_history[0]
    assert logged["sampling/kept_groups_ratio"] == 1.0 and logged["sampling/rounds"] >= 1


def test_stops_at_max_rounds_and_trains_on_what_it_has(tokenizer, make_args):
    rounds_seen = []
    constant = lambda completions, **kwargs: [1.0] * len(completions)  # noqa: E731 - no group ever varies
    trainer = _trainer(tokenizer, make_args, constant, max_steps=1, max_sampling_rounds=3)
    original = trainer.generate_and_score
    trainer.generate_and_score = lambda rows, mode: rounds_seen.append(len(rows)) or original(rows, mode)
    trained = record_trained_batches(trainer)
    trainer.train()
    (batch,) = trained
    assert len(rounds_seen) == 3 and rounds_seen[0] == 8  # the batch, then two refills of the missing 2 groups
    logged = trainer.state.log_history[0]
    assert logged["sampling/rounds"] == 3 and logged["sampling/kept_groups_ratio"] == 0.0
    assert batch.completion_ids.size(0) == 8  # topped up to a full batch


def test_dataset_too_small_for_a_rollout_is_a_clear_error(tokenizer, make_args):
    with pytest.raises(ValueError, match="train_dataset has 1 prompts but one rollout takes 2"):
        GRPOExtTrainer(
            make_tiny_model("qwen2", tokenizer), digit_fraction_reward, args=make_args(dynamic_sampling=True),
            train_dataset=make_prompt_dataset(1), processing_class=tokenizer,
        )  # fmt: skip


def test_max_sampling_rounds_must_be_positive(make_args):
    with pytest.raises(ValueError, match="max_sampling_rounds=0 must be >= 1"):
        make_args(dynamic_sampling=True, max_sampling_rounds=0)
