"""Dual penalties: KL estimators, KL folded into the reward, adaptive coefficient, overlong and missing-EOS shaping."""

import copy
import math

import pytest
import torch

from grpo_ext import GRPOExtTrainer
from grpo_ext.advantages import group_relative_advantages
from grpo_ext.logprobs import completion_logps_and_entropies
from grpo_ext.objective import per_token_kl
from grpo_ext.penalties import AdaptiveKLController, missing_eos_penalty, overlong_penalty, sequence_kl
from grpo_ext.settings import check_settings
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model


def test_estimators_closed_forms():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_r = ref - logp  # [-0.5, 1.0]
    torch.testing.assert_close(per_token_kl(logp, ref, "k1"), -log_r)
    torch.testing.assert_close(per_token_kl(logp, ref, "k2"), log_r**2 / 2)
    torch.testing.assert_close(per_token_kl(logp, ref, "k3"), torch.exp(log_r) - log_r - 1)
    with pytest.raises(ValueError, match="k1"):
        per_token_kl(logp, ref, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_for_kl_on_samples_from_the_policy(estimator):
    """Monte Carlo: the sample mean over x ~ pi is within 5 standard errors of the exact KL(pi || ref)."""
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    ref = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2])
    exact = (pi * (pi.log() - ref.log())).sum().item()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    values = per_token_kl(pi.log()[samples], ref.log()[samples], estimator).double()
    standard_error = values.std().item() / math.sqrt(values.numel())
    assert abs(values.mean().item() - exact) < 5 * standard_error, (values.mean().item(), exact, standard_error)
    assert exact > 50 * standard_error  # the test can tell a biased estimator from an unbiased one


def test_k2_is_biased_here():
    pi, ref = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]), torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2])
    exact = (pi * (pi.log() - ref.log())).sum().item()
    expected_k2 = (pi * per_token_kl(pi.log(), ref.log(), "k2")).sum().item()  # E_pi[k2], exactly
    assert abs(expected_k2 - exact) > 0.05


def test_sequence_kl_sums_over_completion_tokens():
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(sequence_kl(logps, ref, mask, "k1"), torch.tensor([0.5, -3.0]))


def test_kl_in_the_reward_is_applied_before_group_normalisation():
    """Equal raw rewards, different KLs: the completion that drifted more gets the lower advantage."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    kl = torch.tensor([0.0, 2.0, 1.0, 3.0])
    advantages, _ = group_relative_advantages(rewards - 0.1 * kl, num_generations=4)
    assert advantages.abs().min() > 0.1
    assert advantages.argsort().tolist() == [3, 1, 2, 0]  # ordered by KL, highest KL lowest advantage


def test_overlong_penalty_values():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    # max 16, buffer 4: no penalty up to 12, then linear to the factor at 16, and the factor beyond
    torch.testing.assert_close(overlong_penalty(lengths, 16, 4, 0.5), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.5]))


def test_missing_eos_penalty_only_on_truncated():
    torch.testing.assert_close(missing_eos_penalty(torch.tensor([True, False]), 0.7), torch.tensor([0.7, 0.0]))


def test_controller_raises_above_target_and_lowers_below():
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # KL twice the target: error 1.0, clipped to 0.2; 1000 of a 10000 horizon
    assert controller.update(measured_kl=12.0, num_samples=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    assert controller.update(measured_kl=5.4, num_samples=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    controller.load_state_dict(AdaptiveKLController(0.3, 1.0, 5.0).state_dict())
    assert (controller.value, controller.target, controller.horizon) == (0.3, 1.0, 5.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reward_kl_coef": -0.1}, "reward_kl_coef=-0.1 must be >= 0"),
        ({"kl_estimator": "k9"}, "kl_estimator='k9'"),
        ({"reward_kl_estimator": "kl"}, "reward_kl_estimator='kl'"),
        ({"reward_kl_target": 6.0}, "starting reward_kl_coef > 0"),
        ({"overlong_buffer_len": 10, "max_completion_length": 6}, r"overlong_buffer_len=10 must be in \(0, max_"),
        ({"overlong_penalty_factor": -1.0}, "overlong_penalty_factor=-1.0 must be >= 0"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty=-1.0 must be >= 0"),
    ],
)
def test_invalid_penalty_settings(make_args, overrides, message):
    with pytest.raises(ValueError, match=message):  # by the config, or at trainer start (settings.check_settings)
        check_settings(make_args(**overrides))


def test_rollout_shaping_and_metrics(tokenizer, make_args):
    """With a constant reward, only the penalties separate completions; all penalties show up in the logs."""
    policy = make_tiny_model("qwen2", tokenizer)
    args = make_args(
        beta=0.0,
        reward_kl_coef=0.5,
        max_completion_length=6,
        overlong_buffer_len=3,
        missing_eos_penalty=0.2,
        max_steps=1,
    )
    trainer = GRPOExtTrainer(
        policy,
        lambda completions, **kw: [1.0] * len(completions),
        args=args,
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer.reference.mode == "copy"  # the reward-side KL alone needs pi_ref
    with torch.no_grad():  # move the policy away from the reference
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    trainer.model.train()
    rows = [row for row in make_prompt_dataset(2) for _ in range(4)]
    batch = trainer.generate_and_score(rows, mode="train")
    logps = trainer._completion_logps(trainer.model, batch)
    kl = sequence_kl(logps, batch.ref_per_token_logps, batch.completion_mask, "k1")
    lengths = batch.completion_mask.sum(1)
    assert batch.advantages.abs().max() > 0  # constant raw reward, yet signal from the penalties
    penalties = 0.5 * kl + overlong_penalty(lengths, 6, 3, 1.0) + 0.2 * (lengths == 6).float()
    expected, _ = group_relative_advantages(1.0 - penalties, 4)
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=1e-4)
    metrics = trainer.recorder.values["train"]
    assert metrics["reward"][-1] == 1.0 and metrics["reward_shaped"][-1] < 1.0
    assert metrics["penalty/reward_kl"][-1] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert metrics["penalty/reward_kl_coef"][-1] == 0.5
    assert {"penalty/overlong", "penalty/missing_eos"} <= set(metrics)


def _measured_kl(trainer, initial_model, tokenizer):
    """Sequence KL(pi_final || pi_initial) estimated on completions sampled from the final policy (k1, unbiased)."""
    torch.manual_seed(123)
    rows = [row for row in make_prompt_dataset(16, seed=7) for _ in range(8)]
    trainer.model.eval()
    with torch.no_grad():
        batch = trainer.generate_and_score(rows, mode="eval")
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
        keep = batch.completion_ids.size(1)
        final, _ = completion_logps_and_entropies(trainer.model, ids, mask, keep)
        initial, _ = completion_logps_and_entropies(initial_model, ids, mask, keep)
    return sequence_kl(final, initial, batch.completion_mask, "k1").mean().item()


def _train(tokenizer, make_args, **overrides):
    model = make_tiny_model("qwen2", tokenizer)
    initial = copy.deepcopy(model)
    settings = dict(
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=4,
        learning_rate=3e-3,
        max_steps=40,
        beta=0.0,
    )
    settings.update(overrides)
    trainer = GRPOExtTrainer(
        model,
        digit_fraction_reward,
        args=make_args(**settings),
        train_dataset=make_prompt_dataset(64),
        processing_class=tokenizer,
    )
    trainer.train()
    return _measured_kl(trainer, initial, tokenizer)


def test_strong_penalties_keep_the_policy_closer_to_the_reference(tokenizer, make_args):
    free = _train(tokenizer, make_args)
    reward_side = _train(tokenizer, make_args, reward_kl_coef=0.5)
    objective_side = _train(tokenizer, make_args, beta=1.0)
    print(
        f"KL to the initial policy: free {free:.3f}, reward-side {reward_side:.3f}, objective-side {objective_side:.3f}"
    )
    assert free > 0.3  # the unpenalised policy drifted
    assert reward_side < 0.7 * free, (reward_side, free)
    assert objective_side < 0.7 * free, (objective_side, free)


def test_adaptive_coefficient_survives_save_and_resume(tmp_path, tokenizer, make_args):
    settings = dict(
        beta=0.0,
        reward_kl_coef=0.1,
        reward_kl_target=0.01,
        reward_kl_horizon=20,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
    )
    dataset = make_prompt_dataset(16)

    def run(**overrides):
        trainer = GRPOExtTrainer(
            make_tiny_model("qwen2", tokenizer, seed=1),
            digit_fraction_reward,
            args=make_args(**settings, **overrides),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        return trainer

    straight = run()
    straight.train()
    coefs = [
        entry["penalty/reward_kl_coef"] for entry in straight.state.log_history if "penalty/reward_kl_coef" in entry
    ]
    assert len(coefs) == 3 and coefs[0] == 0.1 and coefs[1] != coefs[0]  # the controller moved it

    resumed = run(output_dir=str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    resumed_coefs = [e["penalty/reward_kl_coef"] for e in resumed.state.log_history if "penalty/reward_kl_coef" in e]
    assert resumed_coefs[-1] == pytest.approx(coefs[-1], rel=1e-6)  # continued from the saved value, not 0.1
    assert resumed.reward_kl_controller.value == pytest.approx(straight.reward_kl_controller.value, rel=1e-6)
