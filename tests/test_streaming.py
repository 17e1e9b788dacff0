"""Streamed datasets (`datasets.IterableDataset`) for training and evaluation, with TRL 1.16's rules; dataloader
workers with a map-style dataset."""

import logging

import pytest
from conftest import tiny_trainer
from datasets import Dataset
from trl.trainer.utils import repeat_iterable_dataset

from grpo_ext import GRPOExtTrainer
from grpo_ext.testing import make_tiny_model

G = 4  # num_generations of make_args


def distinct_prompts(n: int) -> Dataset:
    return Dataset.from_dict({"prompt": [f"{i}+1=" for i in range(n)], "answer": [str(i + 1) for i in range(n)]})


def recording_reward(seen: list):
    """A reward function that records the prompts of each call (one call per rollout)."""

    def reward(prompts, completions, answer, **kwargs):
        assert all(p == f"{int(a) - 1}+1=" for p, a in zip(prompts, answer))  # the row's columns travel together
        seen.append(list(prompts))
        return [float(len(c)) for c in completions]

    return reward


@pytest.mark.parametrize("shuffle, num_iterations", [(False, 2), (True, 1)])
def test_streamed_training_groups_each_prompt_as_trl_does(tokenizer, make_args, shuffle, num_iterations):
    """Two rollouts from a stream: each holds 2 prompts, each exactly num_generations times in a row, in the order
    TRL 1.16's rule gives (its repeat_iterable_dataset over the stream, shuffled with the seed when asked); with
    num_iterations=2 the micro-step between them reuses the first rollout."""
    seen = []
    dataset = distinct_prompts(8)
    args = make_args(  # 8 completions per rollout: 2 prompts x 4
        shuffle_dataset=shuffle, num_iterations=num_iterations, max_steps=1 + num_iterations
    )
    trainer = tiny_trainer(tokenizer, args, recording_reward(seen), dataset.to_iterable_dataset())
    trainer.train()

    stream = dataset.to_iterable_dataset()
    stream = stream.shuffle(seed=args.seed) if shuffle else stream
    trl_order = [row["prompt"] for row in repeat_iterable_dataset(stream, G, 2, num_iterations)]
    batches = [trl_order[i : i + 8] for i in range(0, len(trl_order), 8)]
    assert seen == [batches[0], batches[num_iterations]]
    if num_iterations == 2:
        assert batches[1] == batches[0]  # the repeat the trainer served from its buffer
    for rollout in seen:
        assert rollout[:G] == [rollout[0]] * G and rollout[G:] == [rollout[G]] * G and rollout[0] != rollout[G]
    assert len({prompt for rollout in seen for prompt in rollout}) == 4  # no prompt twice within the epoch
    if not shuffle:
        assert seen == [["0+1="] * G + ["1+1="] * G, ["2+1="] * G + ["3+1="] * G]


def test_evaluation_on_streams_returns_metrics(tokenizer, make_args):
    """A stream as eval_dataset, inside a dict, and given to evaluate() directly when __init__ saw none: each
    evaluation batch holds whole groups, and the GRPO metrics are logged."""
    seen = []
    eval_stream = distinct_prompts(4).to_iterable_dataset()
    args = make_args(per_device_eval_batch_size=8)
    trainer = tiny_trainer(tokenizer, args, recording_reward(seen), eval_dataset={"held_out": eval_stream})
    assert args.accelerator_config.dispatch_batches is False

    metrics = trainer.evaluate()
    assert {"eval_held_out_loss", "eval_held_out_runtime"} <= set(metrics)
    logged = trainer.state.log_history[-1]
    assert logged["eval_completions/mean_length"] > 0 and "eval_reward" in logged and "eval_entropy" in logged
    assert len(seen) == 2  # 4 prompts x 4 completions in batches of 8
    assert sorted(p for batch in seen for p in batch[::G]) == [f"{i}+1=" for i in range(4)]
    assert all(batch == [batch[0]] * G + [batch[G]] * G for batch in seen)

    plain = tiny_trainer(tokenizer, make_args(per_device_eval_batch_size=8), recording_reward(seen := []))
    assert "eval_loss" in plain.evaluate(distinct_prompts(4).to_iterable_dataset())
    assert len(seen) == 2 and all(batch == [batch[0]] * G + [batch[G]] * G for batch in seen)

    # num_generations_eval groups an evaluation stream too: 4 prompts x 2 completions, one batch of 8
    pairs = tiny_trainer(
        tokenizer, make_args(per_device_eval_batch_size=8, num_generations_eval=2), recording_reward(seen := [])
    )
    pairs.evaluate(distinct_prompts(4).to_iterable_dataset())
    assert len(seen) == 1 and sorted(seen[0]) == sorted(f"{i}+1=" for i in range(4) for _ in range(2))
    assert seen[0][0::2] == seen[0][1::2]  # each prompt twice in a row


def test_streaming_rules_of_trl(tokenizer, make_args, caplog):
    stream = distinct_prompts(8).to_iterable_dataset()

    def build(args, train=stream, **kwargs):
        return GRPOExtTrainer(make_tiny_model("qwen2", tokenizer), lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=train, processing_class=tokenizer, **kwargs)  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="grpo_ext.data"):
        args = make_args(dataloader_num_workers=2)
        build(args)
    assert "Iterable datasets require `dataloader_num_workers=0` to preserve prompt grouping" in caplog.text
    assert args.dataloader_num_workers == 0 and args.accelerator_config.dispatch_batches is False

    with pytest.raises(ValueError, match=r"Iterable datasets require `dispatch_batches=False`"):
        build(make_args(accelerator_config={"dispatch_batches": True}))
    with pytest.raises(ValueError, match=r"Iterable datasets require `dispatch_batches=False`"):
        build(make_args(accelerator_config={"dispatch_batches": True}), distinct_prompts(8), eval_dataset=stream)
    with pytest.raises(ValueError, match=r"^The train_dataset does not implement __len__.*set max_steps"):
        build(make_args(max_steps=-1, num_train_epochs=1))
    with pytest.raises(ValueError, match=r"dynamic_sampling draws fresh prompts by index"):
        build(make_args(dynamic_sampling=True))
    with pytest.raises(ValueError, match=r"train_dataset streams only 1 prompts but one rollout takes 2"):
        build(make_args(), distinct_prompts(1).to_iterable_dataset())
    with pytest.raises(ValueError, match=r"train_dataset row 1: the prompt is unusable: it is empty"):
        build(make_args(), Dataset.from_dict({"prompt": ["1+1=", " ", "2+2="]}).to_iterable_dataset())
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column"):
        build(make_args(), Dataset.from_dict({"question": ["1+1="] * 8}).to_iterable_dataset())

    map_style = make_args(dataloader_num_workers=2)  # a map-style train set keeps its workers
    build(map_style, distinct_prompts(8))
    assert map_style.dataloader_num_workers == 2 and map_style.accelerator_config.dispatch_batches is None


def test_dataloader_workers_with_a_map_style_dataset(tokenizer, make_args):
    """dataloader_num_workers=2 on a map-style set: worker processes build the batches (the collator is picklable)
    and each rollout still holds whole groups."""
    seen = []
    args = make_args(dataloader_num_workers=2, shuffle_dataset=False, max_steps=1)
    trainer = tiny_trainer(tokenizer, args, recording_reward(seen), distinct_prompts(8))
    assert trainer.get_train_dataloader().num_workers == 2
    trainer.train()
    assert seen == [["0+1="] * G + ["1+1="] * G]
