"""One generation batch split into 1 or 4 micro-batches gives the same update, for every loss_type."""

import pytest
import torch

from grpo_ext import GRPOExtTrainer
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, record_trained_batches, save_tiny_model


def _one_sgd_step(model_path, tokenizer, make_args, loss_type, per_device, accumulation):
    args = make_args(
        loss_type=loss_type,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,  # no clipping: the update is exactly -lr * gradient
        lr_scheduler_type="constant",
        beta=0.04,
        max_completion_length=6,
    )
    trainer = GRPOExtTrainer(
        model_path, digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8), processing_class=tokenizer
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trained = record_trained_batches(trainer)  # the rollout's micro-batches: max_steps=1
    trainer.train()
    # Both runs must roll out exactly the same 8 completions, or the comparison means nothing.
    # (micro-batches are trimmed to their own longest completion, so compare each completion's tokens)
    completions = [
        ids[mask.bool()].tolist() for mb in trained for ids, mask in zip(mb.completion_ids, mb.completion_mask)
    ]
    return {name: before[name] - p.detach() for name, p in trainer.model.named_parameters()}, completions


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "luspo", "cispo", "sapo", "vespo"])
def test_gradient_does_not_depend_on_micro_batching(tmp_path, tokenizer, make_args, loss_type):
    model_path = save_tiny_model(tmp_path / "model")
    whole, completions_whole = _one_sgd_step(model_path, tokenizer, make_args, loss_type, per_device=8, accumulation=1)
    split, completions_split = _one_sgd_step(model_path, tokenizer, make_args, loss_type, per_device=2, accumulation=4)
    assert completions_whole == completions_split
    assert max(update.abs().max().item() for update in whole.values()) > 1e-4  # the step did move the model
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=2e-6, rtol=1e-4, msg=name)
