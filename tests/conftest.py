import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture
def tokenizer():
    from grpo_ext.testing import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def make_args(tmp_path):
    """Build a fast CPU config for this test, overriding any field."""
    return lambda **overrides: tiny_args(tmp_path, **overrides)


@pytest.fixture
def greedy_training_step(tmp_path, make_args):
    """One greedy training step of a GRPOExtTrainer on a saved tiny model and 8 prompts, with config fields
    overridden: returns `(the trained batch, the step's logs, the trainer)`."""
    from grpo_ext import GRPOExtTrainer
    from grpo_ext.testing import (
        digit_fraction_reward,
        make_prompt_dataset,
        make_tokenizer,
        record_trained_batches,
        save_tiny_model,
    )

    model_path = save_tiny_model(tmp_path / "model")

    def one_step(**fields):
        args = make_args(max_steps=1, generation_kwargs={"do_sample": False}, **fields)
        trainer = GRPOExtTrainer(
            model_path, digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
            processing_class=make_tokenizer(),
        )  # fmt: skip
        trained = record_trained_batches(trainer)
        trainer.train()
        (batch,) = trained
        return batch, trainer.state.log_history[0], trainer

    return one_step


def tiny_args(tmp_path, **overrides):
    """A fast CPU config: fp32, no gradient checkpointing, nothing saved or reported."""
    from grpo_ext import GRPOExtConfig

    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return GRPOExtConfig(**settings)


def tiny_trainer(tokenizer, args, reward_funcs=None, dataset=None, **kwargs):
    """A GRPOExtTrainer on a tiny Qwen2 model, 8 short prompts and the digit-fraction reward unless told otherwise."""
    from grpo_ext import GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model

    return GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        reward_funcs if reward_funcs is not None else digit_fraction_reward,
        args=args,
        train_dataset=dataset if dataset is not None else make_prompt_dataset(8),
        processing_class=tokenizer,
        **kwargs,
    )


def vlm_args(tmp_path, **overrides):
    """A fast CPU config for the tiny vision-language models: 1 step of 4 completions of 6 tokens."""
    from grpo_ext import GRPOExtConfig

    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-2,
        max_steps=1,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return GRPOExtConfig(**settings)


def group_prompts(tokenizer, num_generations: int = 4):
    """Four arithmetic prompts, left-padded, each repeated `num_generations` times in a row: `(ids, mask)` (4G, P)."""
    encoded = tokenizer(["1+2=", "33+4=", "5*6=", "7="], return_tensors="pt", padding=True, padding_side="left")
    return (
        encoded["input_ids"].repeat_interleave(num_generations, 0),
        encoded["attention_mask"].repeat_interleave(num_generations, 0),
    )


def processed_distribution(logits, sequence, penalty, temperature, top_k):
    """The sampling distribution by hand: repetition penalty on the tokens in `sequence`, temperature, top-k."""
    import math

    import torch

    logits = logits.clone()
    seen = torch.tensor(sorted(set(sequence)))
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    logits = logits / temperature
    kth = logits.topk(top_k).values[-1]
    return torch.softmax(logits.masked_fill(logits < kth, -math.inf), -1)
