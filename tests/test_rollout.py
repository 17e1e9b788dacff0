"""rollout.py: the Rollout's slicing and trimming, scoring by the path the rollout chose, and the one-time choice."""

import dataclasses
import warnings

import pytest
import torch
from transformers import GenerationConfig

from grpo_ext import decoding, prefix_sharing
from grpo_ext.rollout import (
    GenerationPlan,
    Rollout,
    encode_prompts,
    generate_completions,
    length_buckets_of,
    plan_generation,
    score_rollout,
)
from grpo_ext.testing import make_tiny_model

G = 2


def _rollout(tokenizer, shared_prefix=False):
    """Two prompts x G completions; the longest completion has 4 tokens, the columns after it are padding."""
    prompts = tokenizer(["1+2=", "33+4="], return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = prompts["input_ids"].repeat_interleave(G, 0)  # (4, P)
    prompt_mask = prompts["attention_mask"].repeat_interleave(G, 0)
    completion_ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0], [9, 10, 11, 12, 0, 0], [13, 14, 0, 0, 0, 0]])
    completion_mask = (completion_ids != 0).long()
    old = torch.randn(4, 6) * completion_mask
    return Rollout(
        prompt_ids, prompt_mask, completion_ids, completion_mask, lengths=completion_mask.sum(1),
        is_truncated=torch.zeros(4, dtype=torch.bool), shared_prefix=shared_prefix, old_per_token_logps=old,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
    )  # fmt: skip


def test_trimmed_drops_only_columns_that_are_padding_in_every_row(tokenizer):
    rollout = _rollout(tokenizer)
    trimmed = rollout.trimmed()
    assert trimmed.completion_ids.shape == (4, 4) and trimmed.old_per_token_logps.shape == (4, 4)
    assert torch.equal(trimmed.completion_ids, rollout.completion_ids[:, :4])
    assert torch.equal(trimmed.old_per_token_logps, rollout.old_per_token_logps[:, :4])
    assert torch.equal(trimmed.prompt_ids, rollout.prompt_ids) and torch.equal(trimmed.advantages, rollout.advantages)
    assert trimmed.trimmed() is trimmed  # nothing left to trim
    halves = rollout.split(2)  # each micro-batch to its own longest completion
    assert [h.completion_ids.size(1) for h in halves] == [3, 4]
    assert halves[0].advantages.tolist() == [1.0, -1.0] and halves[1].lengths.tolist() == [4, 2]


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_a_trimmed_rollout_scores_as_the_padded_one(tokenizer, shared_prefix):
    model = make_tiny_model("qwen2", tokenizer)
    rollout = _rollout(tokenizer, shared_prefix)
    with torch.no_grad():
        padded = score_rollout(model, rollout, temperature=0.7, chunk_size=3).logps
        trimmed = score_rollout(model, rollout.trimmed(), temperature=0.7, chunk_size=3).logps
    assert padded[:, 4:].abs().max() == 0  # padding columns score 0
    torch.testing.assert_close(trimmed, padded[:, :4], atol=1e-5, rtol=1e-5)
    assert (trimmed * rollout.completion_mask[:, :4]).abs().sum() > 0  # real log-probs were compared


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_pad_to_multiple_of_pads_rollout_and_micro_batches_and_scores_the_same(tokenizer, shared_prefix):
    model = make_tiny_model("qwen2", tokenizer)
    rollout = _rollout(tokenizer, shared_prefix)  # P = 5, C = 6
    padded = rollout.padded(4, tokenizer.pad_token_id)
    assert padded.prompt_ids.shape == (4, 8) and padded.completion_ids.shape == (4, 8)
    assert padded.old_per_token_logps.shape == (4, 8) and padded.old_per_token_logps[:, 6:].abs().sum() == 0
    assert torch.equal(padded.prompt_ids[:, 3:], rollout.prompt_ids) and (padded.prompt_ids[:, :3] == 0).all()
    assert padded.prompt_mask[:, :3].sum() == 0 and padded.completion_mask[:, 6:].sum() == 0
    assert [h.completion_ids.size(1) for h in rollout.split(2)] == [3, 4]
    assert [h.completion_ids.size(1) for h in padded.split(2)] == [4, 4]  # trimmed to multiples of 4
    with torch.no_grad():
        expected = score_rollout(model, rollout, 0.7, 3, length_buckets=False).logps
        scores = score_rollout(model, padded, 0.7, 3, length_buckets=True)  # buckets are trimmed to multiples too
    torch.testing.assert_close(scores.logps[:, :6], expected, atol=1e-5, rtol=1e-5)
    assert scores.logps[:, 6:].abs().max() == 0 and rollout.padded(None, 0) is rollout


def test_encode_prompts_pads_to_a_multiple_on_the_left(tokenizer):
    plain, plain_mask = encode_prompts(tokenizer, ["1+2=", "33+4="], None, None, "cpu")
    ids, mask = encode_prompts(tokenizer, ["1+2=", "33+4="], None, None, "cpu", pad_to_multiple_of=4)
    assert plain.shape == (2, 5) and ids.shape == (2, 8)
    assert torch.equal(ids[:, 3:], plain) and torch.equal(mask[:, 3:], plain_mask) and mask[:, :3].sum() == 0
    assert (ids[:, :3] == tokenizer.pad_token_id).all()


def test_trainer_loss_is_the_same_with_pad_to_multiple_of(tokenizer, make_args):
    """The trainer's rollout and its micro-batches have widths that are multiples, and the loss does not change."""
    from conftest import record_trained_batches, tiny_trainer

    trainer = tiny_trainer(tokenizer, make_args(pad_to_multiple_of=16, beta=0.0, max_steps=1))
    rollouts, generate_and_score = [], trainer.generate_and_score
    trainer.generate_and_score = lambda rows, mode: rollouts.append(generate_and_score(rows, mode)) or rollouts[-1]
    trained = record_trained_batches(trainer)
    trainer.train()  # one step: one rollout, one micro-batch
    trainer.model.train()
    (rollout,), (micro_batch,) = rollouts, trained
    assert rollout.prompt_ids.size(1) % 16 == 0 and rollout.completion_ids.size(1) == 16  # max_completion_length 6
    assert micro_batch.completion_ids.size(1) == 16
    unpadded = dataclasses.replace(micro_batch, pad_to_multiple_of=None).trimmed()
    prompt_columns = int(unpadded.prompt_mask.any(0).nonzero()[0])  # the first column some prompt uses
    unpadded = dataclasses.replace(
        unpadded,
        prompt_ids=unpadded.prompt_ids[:, prompt_columns:],
        prompt_mask=unpadded.prompt_mask[:, prompt_columns:],
    )
    assert unpadded.completion_ids.size(1) <= 6 and unpadded.prompt_ids.size(1) < rollout.prompt_ids.size(1)
    loss = trainer.compute_loss(trainer.model, micro_batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, unpadded), loss, atol=1e-6, rtol=1e-5)


def test_the_plan_is_made_once_and_generation_follows_it(tokenizer, monkeypatch):
    monkeypatch.setattr(prefix_sharing, "_WARNED", set())
    monkeypatch.setattr(decoding, "_WARNED", set())
    model = make_tiny_model("llama", tokenizer)
    prompts = tokenizer(["1+2=", "33+4="], return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = prompts["input_ids"].repeat_interleave(G, 0)
    prompt_mask = prompts["attention_mask"].repeat_interleave(G, 0)
    greedy = dict(do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert plan_generation(model, GenerationConfig(**greedy), True, True) == GenerationPlan(True, True, True)
    assert plan_generation(model, GenerationConfig(**greedy), False, True) == GenerationPlan(False, True, False)
    # A static cache: generate's own loop on every row, but scoring still shares the prompts
    static = GenerationConfig(**greedy, cache_implementation="static")
    with pytest.warns(UserWarning, match="cache_implementation='static'") as caught:
        assert plan_generation(model, static, True, True) == GenerationPlan(True, False, False)
    assert len(caught) == 2  # one per engine that cannot run this config
    assert "Generation prefills every row" in str(caught[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert plan_generation(model, static, True, True) == GenerationPlan(True, False, False)
    plans = [GenerationPlan(shared, drop, shared) for shared in (False, True) for drop in (False, True)]
    outputs = [generate_completions(model, prompt_ids, prompt_mask, G, GenerationConfig(**greedy), p) for p in plans]
    for plan, output in zip(plans, outputs):
        assert torch.equal(output, outputs[0]) and output.shape == (4, 5), plan


def test_length_buckets_cut_while_it_saves_padding():
    mask = lambda lengths: (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()  # noqa: E731
    assert [b.tolist() for b in length_buckets_of(mask([3, 1, 4, 2]))] == [[1, 3], [0, 2]]  # 16 -> 12 tokens
    assert len(length_buckets_of(mask([4, 4, 4, 4]))) == 1  # nothing to save
    buckets = length_buckets_of(mask([8, 1, 1, 1, 1, 1, 1, 8]))  # 64 -> 36 -> 22 tokens; 4 parts: 22 again
    assert [b.tolist() for b in buckets] == [[1, 2, 3], [4, 5, 6], [0, 7]]


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_scoring_in_length_buckets_gives_the_same_values_and_gradients(tokenizer, shared_prefix):
    model = make_tiny_model("qwen2", tokenizer)
    rollout = _rollout(tokenizer, shared_prefix)
    weights = torch.randn(4, 6)
    results = []
    for buckets in (False, True):
        model.zero_grad()
        scores = score_rollout(model, rollout, 0.7, 3, length_buckets=buckets)
        logps, entropies = scores.logps, scores.entropies
        (logps * weights).sum().backward()
        results.append((logps.detach(), entropies, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_logps, plain_entropies, plain_grads), (bucket_logps, bucket_entropies, bucket_grads) = results
    assert len(length_buckets_of(rollout.completion_mask)) == 2  # the bucketed path really ran
    torch.testing.assert_close(bucket_logps, plain_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucket_entropies, plain_entropies, atol=1e-5, rtol=1e-5)
    assert max(g.abs().max().item() for g in plain_grads.values()) > 0
    for name in plain_grads:
        torch.testing.assert_close(bucket_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_cache_implementation_reaches_generate_and_scoring_still_shares(tokenizer, make_args, monkeypatch):
    from conftest import tiny_trainer

    monkeypatch.setattr(prefix_sharing, "_WARNED", set())
    monkeypatch.setattr(decoding, "_WARNED", set())
    trainer = tiny_trainer(tokenizer, make_args(cache_implementation="static", max_steps=1))
    assert trainer.generation_config.cache_implementation == "static"
    seen = {}
    generate = type(trainer.model).generate

    def recording_generate(self, *args, **kwargs):
        seen["cache"] = kwargs.get("cache")  # generate builds its own StaticCache: none handed in
        seen["config"] = kwargs["generation_config"].cache_implementation
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model), "generate", recording_generate)
    with pytest.warns(UserWarning, match="Generation prefills every row"):
        rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(4)]  # 2 groups of G = 4
        rollout = trainer.generate_and_score(rows, "train")
    assert seen == {"cache": None, "config": "static"}
    assert rollout.shared_prefix and rollout.completion_ids.shape == (8, 6)


def test_continuous_batching_generates_what_generate_does_greedily(tokenizer):
    from transformers.generation import ContinuousBatchingConfig

    model = make_tiny_model("llama", tokenizer)
    prompts = tokenizer(["1+2=", "33+4="], return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = prompts["input_ids"].repeat_interleave(G, 0)
    prompt_mask = prompts["attention_mask"].repeat_interleave(G, 0)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    batching = ContinuousBatchingConfig(max_memory_percent=0.5)
    plan = plan_generation(model, greedy, True, True, batching)
    assert plan == GenerationPlan(shared_prefix=True, continuous_batching=batching)  # its own engine for generation
    model.train()
    batched = generate_completions(model, prompt_ids, prompt_mask, G, greedy, plan)
    assert model.training  # put back as it was
    plain = generate_completions(model.eval(), prompt_ids, prompt_mask, G, greedy, GenerationPlan())
    assert batched.shape == plain.shape == (2 * G, 5) and torch.equal(batched, plain)


def test_continuous_batching_config_follows_trl(make_args):
    from grpo_ext.rollout import continuous_batching_config

    assert continuous_batching_config(make_args()) is None
    config = continuous_batching_config(make_args(use_transformers_continuous_batching=True))
    assert config.max_memory_percent == 0.5  # TRL's training-aware default
    config = continuous_batching_config(
        make_args(
            use_transformers_continuous_batching=True,
            transformers_continuous_batching_config='{"max_memory_percent": 0.3}',
        )
    )
    assert config.max_memory_percent == 0.3
    with pytest.warns(FutureWarning, match="use_transformers_paged"):
        assert make_args(use_transformers_paged=True).use_transformers_continuous_batching


def test_the_trainer_generates_with_continuous_batching_when_asked(tokenizer, make_args, monkeypatch):
    from types import SimpleNamespace

    from conftest import tiny_trainer

    trainer = tiny_trainer(tokenizer, make_args(use_transformers_continuous_batching=True, max_steps=1))
    calls = []

    def generate_batch(self, inputs, generation_config, continuous_batching_config, **kwargs):  # the engine, faked
        calls.append((inputs, continuous_batching_config.max_memory_percent))
        answer = tokenizer("12", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {f"req_{i}": SimpleNamespace(generated_tokens=answer, error=None) for i in range(len(inputs))}

    monkeypatch.setattr(type(trainer.model), "generate_batch", generate_batch)
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(4)]  # 2 groups of G = 4
    rollout = trainer.generate_and_score(rows, "train")
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    assert calls == [(prompts, 0.5)]  # the rollout's rows, unpadded; TRL's memory share
    answer = [*tokenizer("12", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert rollout.completion_ids.tolist() == [answer] * 8 and rollout.lengths.tolist() == [3] * 8
    assert rollout.shared_prefix  # scoring still shares the prompts
