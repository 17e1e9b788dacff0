import math

import torch

from grpo_ext.advantages import (
    STD_EPSILON,
    batch_normalized_advantages,
    group_normalized_rewards,
    group_relative_advantages,
    group_std,
)


def test_group_normalisation_closed_form():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages, std = group_relative_advantages(rewards, num_generations=4, scale_rewards="group")
    group_std = math.sqrt(((0.5**2) * 4) / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (group_std + STD_EPSILON)
    torch.testing.assert_close(advantages[:4], expected)
    torch.testing.assert_close(advantages[4:], torch.zeros(4))  # equal rewards carry no signal
    assert std[4:].eq(0).all()


def test_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0])
    none, _ = group_relative_advantages(rewards, 2, "none")
    torch.testing.assert_close(none, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    batch, _ = group_relative_advantages(rewards, 2, "batch")
    torch.testing.assert_close(batch, none / (rewards.std() + STD_EPSILON))


def test_nan_rewards_are_skipped():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    advantages, _ = group_relative_advantages(rewards, 4, "none")
    torch.testing.assert_close(advantages, torch.tensor([-2.0, 0.0, 0.0, 2.0]))


def test_groups_of_one_have_zero_std_and_zero_advantage():
    """Evaluation with num_generations_eval=1: nothing to compare, std 0 (TRL logs frac_reward_zero_std = 1)."""
    rewards = torch.tensor([0.3, 2.0, -1.0])
    for scale_rewards in ("group", "none"):
        advantages, std = group_relative_advantages(rewards, 1, scale_rewards)
        assert advantages.eq(0).all() and std.eq(0).all()
    assert group_std(rewards, 1).eq(0).all()


def test_gdpo_normalises_each_function_within_its_group():
    nan = float("nan")
    rewards_per_func = torch.tensor([[1.0, 10.0], [3.0, nan], [0.0, 5.0], [0.0, nan]])  # (4, 2), groups of 2
    normalized = group_normalized_rewards(rewards_per_func, 2)
    std = math.sqrt(2)  # Bessel-corrected std of [1, 3]
    torch.testing.assert_close(normalized[:2, 0], torch.tensor([-1.0, 1.0]) / (std + STD_EPSILON))
    torch.testing.assert_close(normalized[2:, 0], torch.zeros(2))  # equal rewards
    assert normalized[:, 1].isnan().all()  # one scored value per group: no std, left out as in TRL
    advantages, batch_std = batch_normalized_advantages(torch.tensor([1.0, 3.0, nan, 5.0]))
    torch.testing.assert_close(advantages, torch.tensor([-2.0, 0.0, 0.0, 2.0]) / (2.0 + STD_EPSILON))
    torch.testing.assert_close(batch_std, torch.full((4,), 2.0))
