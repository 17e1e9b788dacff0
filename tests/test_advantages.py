import math

import torch

from grpo_ext.advantages import STD_EPSILON, group_relative_advantages


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
