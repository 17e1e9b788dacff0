"""moe.py and `router_aux_loss_coef`: the scoring pass gives the MoE model's own load-balancing loss (plain and
prefix-shared), the trainer adds coef x that loss to the GRPO loss and logs it, and dense models have none."""

import pytest
import torch

from grpo_ext import GRPOExtTrainer
from grpo_ext.logprobs import position_ids_from_mask
from grpo_ext.moe import is_moe, router_aux_coef
from grpo_ext.objective import Normalisers
from grpo_ext.rollout import Rollout, score_rollout
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model

G = 2


def _moe_model(tokenizer, **config):
    return make_tiny_model("qwen3_moe", tokenizer, output_router_logits=True, **config)


def _rollout(tokenizer, shared_prefix=False):
    """Two prompts x G completions of uneven lengths, right-padded with 0."""
    prompts = tokenizer(["1+2=", "33+4="], return_tensors="pt", padding=True, padding_side="left")
    completion_ids = torch.tensor([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 15], [13, 14, 0, 0, 0]])
    completion_mask = (completion_ids != 0).long()
    return Rollout(
        prompts["input_ids"].repeat_interleave(G, 0), prompts["attention_mask"].repeat_interleave(G, 0),
        completion_ids, completion_mask, lengths=completion_mask.sum(1), is_truncated=torch.zeros(4, dtype=torch.bool),
        shared_prefix=shared_prefix, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
    )  # fmt: skip


def _own_aux_loss(model, rollout: Rollout) -> torch.Tensor:
    """The model's own forward on prompt + completion: its `aux_loss` output."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).aux_loss


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_scoring_gives_the_models_own_load_balancing_loss_and_gradient(tokenizer, shared_prefix):
    model = _moe_model(tokenizer)
    rollout = _rollout(tokenizer, shared_prefix)
    router = model.model.layers[0].mlp.gate.weight
    expected = _own_aux_loss(model, rollout)
    (expected_grad,) = torch.autograd.grad(expected, router)
    scores = score_rollout(model, rollout, 1.0, 3, router_aux_loss=True)
    (grad,) = torch.autograd.grad(scores.aux_loss, router)
    assert expected.item() > 1.0  # num_experts x sum_e f_e P_e: 1 when perfectly balanced, > 1 here
    torch.testing.assert_close(scores.aux_loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)
    assert score_rollout(model, rollout, 1.0, 3).aux_loss is None  # not asked: not computed


def _trainer(tokenizer, make_args, model, **args):
    return GRPOExtTrainer(
        model, digit_fraction_reward, args=make_args(beta=0.0, **args), train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )  # fmt: skip


def test_loss_is_the_grpo_loss_plus_coef_times_the_models_aux_loss(tokenizer, make_args):
    trainer = _trainer(tokenizer, make_args, _moe_model(tokenizer), router_aux_loss_coef=0.5)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
    rollout = _rollout(tokenizer)
    rollout.normalisers = Normalisers(
        num_sequences=4.0, num_tokens=float(rollout.completion_mask.sum()), num_global_tokens=11.0,
        max_completion_length=6,
    )  # fmt: skip
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, rollout)
    own_aux_loss = _own_aux_loss(trainer.model, rollout)
    trainer.aux_loss_enabled = False
    grpo_loss = trainer.compute_loss(trainer.model, rollout)
    torch.testing.assert_close(loss, grpo_loss + 0.5 * own_aux_loss, atol=1e-5, rtol=1e-5)
    assert trainer.recorder.values["train"]["aux_loss"] == [pytest.approx(own_aux_loss.item(), rel=1e-5)]


def test_coefficient_defaults_to_the_model_configs_and_training_logs_aux_loss(tokenizer, make_args):
    model = _moe_model(tokenizer, router_aux_loss_coef=0.02)
    trainer = _trainer(tokenizer, make_args, model, max_steps=1)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
    trainer.train()
    logged = [entry["aux_loss"] for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(logged) == 1 and logged[0] > 1.0
    assert router_aux_coef(model, 0.0) == 0.0  # 0.0 turns it off


def test_dense_models_have_no_load_balancing_loss(tokenizer, make_args):
    dense = make_tiny_model("qwen2", tokenizer)
    assert not is_moe(dense) and is_moe(_moe_model(tokenizer))
    trainer = _trainer(tokenizer, make_args, dense)
    assert not trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1 is set but Qwen2ForCausalLM is not a Mixture"):
        router_aux_coef(dense, 0.1)
