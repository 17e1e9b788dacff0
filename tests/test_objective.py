"""The objective on hand-made tensors against closed-form values (docs/architecture.md, "One training step")."""

import math

import pytest
import torch

from grpo_ext.objective import (
    LOSS_TYPES,
    EntropyController,
    SurrogateParams,
    aggregate_loss,
    grpo_per_token_loss,
    high_entropy_mask,
    log_importance_weights,
    mean_entropy,
    off_policy_mask,
    per_token_kl,
)

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
    params = SurrogateParams(epsilon_low=0.2, epsilon_high=0.3)
    terms = grpo_per_token_loss(logps, old, advantages, mask, params=params)
    high, low = math.exp(0.5), math.exp(-0.5)
    # A > 0, rho high: min(rho A, 1.3 A) = 1.3 (clipped). A < 0, rho high: min(-rho, -1.3) = -rho (not clipped).
    # A > 0, rho low: min(rho, 0.8) = rho. A < 0, rho low: min(-rho, -0.8) = -0.8 (clipped).
    expected = torch.tensor([[-1.3], [high], [-low], [0.8]])
    torch.testing.assert_close(terms.per_token_loss, expected)
    assert terms.is_high_clipped.squeeze(-1).tolist() == [True, False, False, False]
    assert terms.is_low_clipped.squeeze(-1).tolist() == [False, False, False, True]
    # The clipped tokens carry no gradient; the others do.
    logps = logps.clone().requires_grad_(True)
    grpo_per_token_loss(logps, old, advantages, mask, params=params).per_token_loss.sum().backward()
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
        params=SurrogateParams(epsilon_low=0.5, epsilon_high=0.5),
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
        ("luspo", ((1 + 2) + (3 + 4 + 5)) / 2),
        ("cispo", (1 + 2 + 3 + 4 + 5) / 5),
        ("sapo", ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2),
        ("vespo", (1 + 2 + 3 + 4 + 5) / 5),
    ],
)
def test_aggregation_closed_forms(loss_type, expected):
    per_token_loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    loss = aggregate_loss(per_token_loss, MASK, loss_type, num_sequences=2, num_tokens=5, max_completion_length=4)
    assert loss.item() == pytest.approx(expected)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "ppo", 1, 1, 1)


def test_every_loss_type_has_a_closed_form_case():
    cases = test_aggregation_closed_forms.pytestmark[0].args[1]
    assert {loss_type for loss_type, _ in cases} == set(LOSS_TYPES)


def _one_token(log_ratio: float, advantage: float, logp: float = -0.7):
    """One-token completions: logp, old logp = logp - log_ratio, advantage; logp requires grad."""
    logps = torch.tensor([[logp]], requires_grad=True)
    return logps, logps.detach() - log_ratio, torch.tensor([advantage]), torch.ones(1, 1)


def test_cispo_caps_and_detaches_the_weight():
    # rho = e^0.5 ~ 1.65 capped at 1.2: L = -1.2 A logp, dL/dlogp = -1.2 A (the cap carries no gradient)
    cap = SurrogateParams(epsilon_high=1.2)
    logps, old, advantages, mask = _one_token(0.5, 2.0)
    terms = grpo_per_token_loss(logps, old, advantages, mask, loss_type="cispo", params=cap)
    assert terms.per_token_loss.item() == pytest.approx(-1.2 * 2.0 * -0.7)
    assert terms.is_low_clipped is None and terms.metrics["cispo_clip_ratio"].item() == 1.0
    terms.per_token_loss.sum().backward()
    assert logps.grad.item() == pytest.approx(-1.2 * 2.0)
    # below the cap the weight is rho itself, still detached: dL/dlogp = -rho A
    logps, old, advantages, mask = _one_token(-0.5, 2.0)
    terms = grpo_per_token_loss(logps, old, advantages, mask, loss_type="cispo", params=cap)
    terms.per_token_loss.sum().backward()
    assert logps.grad.item() == pytest.approx(-math.exp(-0.5) * 2.0)
    assert terms.metrics["cispo_clip_ratio"].item() == 0.0


def test_sapo_soft_gate_with_its_two_temperatures():
    params = SurrogateParams(sapo_temperature_pos=1.0, sapo_temperature_neg=2.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    rho = math.exp(0.5)
    for advantage, tau in ((1.5, 1.0), (-1.5, 2.0)):
        logps, old, advantages, mask = _one_token(0.5, advantage)
        terms = grpo_per_token_loss(logps, old, advantages, mask, loss_type="sapo", params=params)
        assert terms.per_token_loss.item() == pytest.approx(-4 / tau * sigmoid(tau * (rho - 1)) * advantage)
        terms.per_token_loss.sum().backward()  # d/dlogp = -4 sigma'(tau (rho - 1)) rho A
        gate_slope = sigmoid(tau * (rho - 1)) * (1 - sigmoid(tau * (rho - 1)))
        assert logps.grad.item() == pytest.approx(-4 * gate_slope * rho * advantage)
    # on-policy its gradient is the plain policy gradient: -A
    logps, old, advantages, mask = _one_token(0.0, 1.5)
    grpo_per_token_loss(logps, old, advantages, mask, loss_type="sapo").per_token_loss.sum().backward()
    assert logps.grad.item() == pytest.approx(-1.5)


def test_vespo_gamma_weight_of_the_summed_sequence_ratio():
    # two tokens with log rho 0.1 and 0.2 (a third masked out): log w = 0.3; A >= 0 uses (k, lambda) = (2, 3)
    logps = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    old = logps.detach() - torch.tensor([[0.1, 0.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    phi = math.exp(3 + 2 * 0.3 - 3 * math.exp(0.3))
    terms = grpo_per_token_loss(logps, old, torch.tensor([0.8]), mask, loss_type="vespo")
    torch.testing.assert_close(
        terms.per_token_loss, torch.tensor([[phi * 0.8 * 0.5, phi * 0.8 * 1.0, phi * 0.8 * 2.0]])
    )
    assert terms.metrics["vespo/phi_seq_mean"].item() == pytest.approx(phi)
    (terms.per_token_loss * mask).sum().backward()  # phi is a detached weight: d/dlogp_t = -phi A m_t
    torch.testing.assert_close(logps.grad, torch.tensor([[-phi * 0.8, -phi * 0.8, 0.0]]))
    # A < 0 uses (k, lambda) = (3, 2); phi(1) = 1 on-policy
    terms = grpo_per_token_loss(logps, old, torch.tensor([-0.8]), mask, loss_type="vespo")
    assert terms.metrics["vespo/phi_seq_mean"].item() == pytest.approx(math.exp(2 + 3 * 0.3 - 2 * math.exp(0.3)))
    on_policy = grpo_per_token_loss(logps, logps.detach(), torch.tensor([0.8]), mask, loss_type="vespo")
    assert on_policy.metrics["vespo/phi_seq_mean"].item() == pytest.approx(1.0)


def test_delta_caps_the_ratio_of_a_negative_advantage():
    # rho = e^2 ~ 7.39, A = -1: PPO's loss is -min(-rho, -1.2) = rho; with delta = 3 it is 3
    logps, old, advantages, mask = _one_token(2.0, -1.0)
    plain = grpo_per_token_loss(logps, old, advantages, mask)
    capped = grpo_per_token_loss(logps, old, advantages, mask, params=SurrogateParams(delta=3.0))
    assert plain.per_token_loss.item() == pytest.approx(math.exp(2.0))
    assert capped.per_token_loss.item() == pytest.approx(3.0)
    capped.per_token_loss.sum().backward()
    assert logps.grad.item() == 0.0  # capped: no gradient pushes the ratio further


def test_bias_corrected_kl_is_weighted_by_the_ratio():
    logps, old, advantages, mask = _one_token(0.5, 0.0)
    ref = logps.detach() + 0.3
    k3 = math.exp(0.3) - 0.3 - 1
    terms = grpo_per_token_loss(logps, old, advantages, mask, ref, beta=0.1, bias_correction_kl=True)
    assert terms.per_token_kl.item() == pytest.approx(math.exp(0.5) * k3)
    assert terms.per_token_loss.item() == pytest.approx(0.1 * math.exp(0.5) * k3)  # A = 0: only the KL term


def test_off_policy_mask_drops_negative_advantages_that_drifted():
    # mean token KL(pi_old || pi) per row: 0.6, 0.6, 0.1 (the masked 9.0 ignored)
    logps = torch.zeros(3, 2)
    old = torch.tensor([[0.4, 0.8], [0.4, 0.8], [0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0, -1.0])
    keep = off_policy_mask(advantages, logps, old, mask, threshold=0.5)
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0]  # drifted but A >= 0 / drifted and A < 0 / close
    terms = grpo_per_token_loss(
        logps, old, advantages, mask, ref_per_token_logps=logps + 0.3, beta=0.1, token_mask=keep
    )
    k3 = math.exp(0.3) - 0.3 - 1
    torch.testing.assert_close(terms.per_token_loss[1], torch.full((2,), 0.1 * k3))  # the KL term is never masked


def test_high_entropy_mask_keeps_the_top_quantile():
    entropies = torch.tensor([[0.1, 2.0, 0.5, 7.0], [3.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # valid entropies, sorted 0.1, 0.5, 1.0, 2.0, 3.0: the 0.6 quantile sits at index 2.4, 1.0 + 0.4 x (2.0 - 1.0)
    values = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0])
    threshold = torch.quantile(values, 0.6).item()
    assert threshold == pytest.approx(1.0 + 0.4 * (2.0 - 1.0))
    kept = high_entropy_mask(entropies, mask, 0.6)
    assert kept.tolist() == [[False, True, False, False], [True, False, False, False]]  # padding (7.0) never kept
    assert high_entropy_mask(entropies, mask, 0.0).sum() == 5  # quantile 0: every valid token
    assert mean_entropy(entropies, mask).item() == pytest.approx((0.1 + 2.0 + 0.5 + 3.0 + 1.0) / 5)


def test_adaptive_entropy_controller():
    control = EntropyController(0.01, adaptive=True, coef_min=0.0, coef_max=0.02, step=0.005, target=1.0)
    assert control.applied_coef() == 0.0  # nothing measured yet
    assert control.update(0.5) == pytest.approx(0.015) and control.applied_coef() == pytest.approx(0.015)
    assert control.update(0.9) == pytest.approx(0.02)  # capped at coef_max
    assert control.update(2.0) == pytest.approx(0.015) and control.applied_coef() == 0.0  # above target: off
    restored = EntropyController(0.01, adaptive=True)
    restored.load_state_dict(control.state_dict())
    assert (restored.coef, restored.last_entropy) == (control.coef, 2.0)
    static = EntropyController(0.05)
    assert static.enabled and static.applied_coef() == 0.05 and static.update(9.0) == 0.05
    assert not EntropyController(0.0).enabled
