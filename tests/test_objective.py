"""The objective on hand-made tensors against closed-form values (docs/architecture.md, "One training step")."""

import math

import pytest
import torch

from grpo_ext.objective import aggregate_loss, grpo_per_token_loss, log_importance_weights, per_token_kl

LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_k3_closed_form_and_non_negative():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, 0.0])
    expected = [math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.5) - 0.5 - 1]
    torch.testing.assert_close(per_token_kl(logp, ref, "k3"), torch.tensor(expected))
    diffs = torch.linspace(-10, 10, 1001)
    assert (per_token_kl(torch.zeros_like(diffs), diffs, "k3") >= 0).all()


def test_on_policy_loss_is_minus_advantage_times_ratio_one():
    """With pi_old == pi_theta and beta == 0, every token's loss is -A (ratio 1, nothing clipped)."""
    advantages = torch.tensor([0.7, -1.3])
    terms = grpo_per_token_loss(LOGPS, LOGPS, advantages, MASK)
    torch.testing.assert_close(terms.per_token_loss, -advantages[:, None].expand(2, 3))
    assert not terms.is_low_clipped.any() and not terms.is_high_clipped.any()


def test_clipping_both_sides():
    # ratios e^0.5 ~ 1.65 (above 1 + 0.2) and e^-0.5 ~ 0.61 (below 1 - 0.2), for positive and negative advantages
    old = torch.zeros(4, 1)
    logps = torch.tensor([[0.5], [0.5], [-0.5], [-0.5]])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1)
    terms = grpo_per_token_loss(logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.3)
    high, low = math.exp(0.5), math.exp(-0.5)
    # A > 0, rho high: min(rho A, 1.3 A) = 1.3 (clipped). A < 0, rho high: min(-rho, -1.3) = -rho (not clipped).
    # A > 0, rho low: min(rho, 0.8) = rho. A < 0, rho low: min(-rho, -0.8) = -0.8 (clipped).
    expected = torch.tensor([[-1.3], [high], [-low], [0.8]])
    torch.testing.assert_close(terms.per_token_loss, expected)
    assert terms.is_high_clipped.squeeze(-1).tolist() == [True, False, False, False]
    assert terms.is_low_clipped.squeeze(-1).tolist() == [False, False, False, True]
    # The clipped tokens carry no gradient; the others do.
    logps = logps.clone().requires_grad_(True)
    grpo_per_token_loss(logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.3).per_token_loss.sum().backward()
    torch.testing.assert_close(logps.grad.squeeze(-1), torch.tensor([0.0, high, -low, 0.0]))


def test_kl_term_added_with_beta():
    ref = LOGPS + 0.3
    advantages = torch.tensor([1.0, -1.0])
    terms = grpo_per_token_loss(LOGPS, LOGPS, advantages, MASK, ref_per_token_logps=ref, beta=0.04)
    expected = -advantages[:, None] + 0.04 * (math.exp(0.3) - 0.3 - 1)
    torch.testing.assert_close(terms.per_token_loss, expected.expand(2, 3))
    torch.testing.assert_close(terms.per_token_kl, torch.full((2, 3), math.exp(0.3) - 0.3 - 1))


def test_gspo_sequence_ratio_is_length_normalised():
    old = torch.zeros(2, 3)
    logps = torch.tensor([[0.2, 0.4, 9.0], [0.3, -0.3, 0.6]])  # the third token of row 0 is masked out
    log_w = log_importance_weights(logps, old, MASK, level="sequence")
    torch.testing.assert_close(log_w, torch.tensor([[0.3], [0.2]]))
    terms = grpo_per_token_loss(
        logps,
        old,
        torch.tensor([1.0, 1.0]),
        MASK,
        importance_sampling_level="sequence",
        epsilon_low=0.5,
        epsilon_high=0.5,
    )
    torch.testing.assert_close(terms.ratio, torch.tensor([[math.exp(0.3)], [math.exp(0.2)]]))


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # per-token losses: row 0 [1, 2, (9)], row 1 [3, 4, 5]; 2 sequences, 5 tokens, max length 4
        ("grpo", ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2),
        ("dapo", (1 + 2 + 3 + 4 + 5) / 5),
        ("bnpo", (1 + 2 + 3 + 4 + 5) / 5),
        ("dr_grpo", (1 + 2 + 3 + 4 + 5) / (2 * 4)),
    ],
)
def test_aggregation_closed_forms(loss_type, expected):
    per_token_loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    loss = aggregate_loss(per_token_loss, MASK, loss_type, num_sequences=2, num_tokens=5, max_completion_length=4)
    assert loss.item() == pytest.approx(expected)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "ppo", 1, 1, 1)
