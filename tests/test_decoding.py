"""decoding.py: dropping finished rows changes neither greedy completions nor the sampling distribution."""

import math

import pytest
import torch
from conftest import group_prompts, processed_distribution
from transformers import GenerationConfig

from grpo_ext import prefix_sharing
from grpo_ext.decoding import generate_dropping_finished, unsupported_reason
from grpo_ext.testing import make_tiny_model

G = 4


def _stops_at_uneven_steps(model, tokenizer, prompt_ids, prompt_mask):
    """Greedy settings whose stop tokens end the four groups after different numbers of tokens."""
    free = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    completions = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=free)
    completions = completions[:, prompt_ids.size(1) :]
    stops = {int(completions[0, 1]), int(completions[G, 4]), int(completions[2 * G, 7])}
    return GenerationConfig(
        do_sample=False, max_new_tokens=12, eos_token_id=[tokenizer.eos_token_id, *stops], pad_token_id=0
    )


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_greedy_completions_equal_generate(tokenizer, architecture):
    model = make_tiny_model(architecture, tokenizer).eval()
    prompt_ids, prompt_mask = group_prompts(tokenizer)
    config = _stops_at_uneven_steps(model, tokenizer, prompt_ids, prompt_mask)
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    expected = expected[:, prompt_ids.size(1) :]
    lengths = (expected != 0).sum(1)
    assert len(set(lengths.tolist())) >= 2  # rows really finish at different steps (and leave the batch)
    assert torch.equal(generate_dropping_finished(model, prompt_ids, prompt_mask, config), expected)
    # From a prompt cache prefilled once per group (prefix sharing), too
    unique_ids, unique_mask = prefix_sharing.unique_prompts(prompt_ids, prompt_mask, G)
    cache = prefix_sharing.shared_prompt_cache(model, unique_ids, unique_mask, G)
    assert torch.equal(generate_dropping_finished(model, prompt_ids, prompt_mask, config, cache=cache), expected)
    # Rules that read the stop tokens (min_new_tokens masks them for the first tokens) apply as in generate
    config.min_new_tokens = int(lengths.min()) + 2
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    expected = expected[:, prompt_ids.size(1) :]
    assert (expected != 0).sum(1).min() >= config.min_new_tokens
    assert torch.equal(generate_dropping_finished(model, prompt_ids, prompt_mask, config), expected)


def test_all_rows_run_to_the_limit_when_none_stops(tokenizer):
    model = make_tiny_model("qwen2", tokenizer).eval()
    prompt_ids, prompt_mask = group_prompts(tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=[tokenizer.eos_token_id], pad_token_id=0)
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    assert torch.equal(generate_dropping_finished(model, prompt_ids, prompt_mask, config), expected[:, -6:])


def test_sampled_completions_follow_the_model_distribution(tokenizer):
    """Two-token completions of one prompt; a third of the rows stop after one token and leave the batch. The
    frequency of every (first, second) pair matches the exact probability (chi-square, fixed seed)."""
    model = make_tiny_model("qwen2", tokenizer).eval()
    prompt = tokenizer(["12+34="], return_tensors="pt")["input_ids"]  # (1, P)
    penalty, temperature, top_k = 1.3, 0.7, 6
    with torch.no_grad():
        first = processed_distribution(
            model(prompt).logits[0, -1].float(), prompt[0].tolist(), penalty, temperature, top_k
        )
    candidates = first.nonzero().squeeze(1).tolist()  # the top-k first tokens
    stops = candidates[:2]  # two of them end the completion
    expected = {(t,): first[t].item() for t in stops}
    with torch.no_grad():
        for t in candidates[2:]:
            sequence = torch.cat([prompt[0], torch.tensor([t])])
            second = processed_distribution(
                model(sequence[None]).logits[0, -1].float(), sequence.tolist(), penalty, temperature, top_k
            )
            expected.update({(t, u): first[t].item() * second[u].item() for u in second.nonzero().squeeze(1).tolist()})
    assert sum(p for key, p in expected.items() if len(key) == 1) > 0.1  # rows do stop early
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0, repetition_penalty=penalty,
        max_new_tokens=2, eos_token_id=stops, pad_token_id=0,
    )  # fmt: skip
    samples = 4000
    torch.manual_seed(0)
    completions = generate_dropping_finished(
        model, prompt.repeat(samples, 1), torch.ones(samples, prompt.size(1)), config
    )
    counts = {}
    for row in completions.tolist():
        key = (row[0],) if row[0] in stops else tuple(row)
        assert row[0] not in stops or row[1] == 0  # padded after the stop token
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(expected)  # nothing outside the processed distribution's support
    cells = [key for key in expected if expected[key] * samples >= 5]  # chi-square over well-filled cells
    rest = samples - sum(counts.get(key, 0) for key in cells)
    rest_expected = samples * (1 - sum(expected[key] for key in cells))
    statistic = sum((counts.get(k, 0) - samples * expected[k]) ** 2 / (samples * expected[k]) for k in cells)
    statistic += (rest - rest_expected) ** 2 / max(rest_expected, 1.0)
    degrees = len(cells)  # cells + the rest, minus one
    # 99.9th percentile of chi-square with `degrees` degrees of freedom (Wilson-Hilferty)
    z = 3.09
    limit = degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3
    assert statistic < limit, (statistic, limit, degrees)


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"num_beams": 2}, "num_beams"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences"),
        ({"cache_implementation": "static"}, "cache_implementation='static'"),
        ({"stop_strings": ["\n"]}, "stop_strings"),
        ({"use_cache": False}, "use_cache"),
    ],
)
def test_settings_that_need_generate_are_named(tokenizer, settings, reason):
    model = make_tiny_model("qwen2", tokenizer)
    config = GenerationConfig(max_new_tokens=4, pad_token_id=0, **settings)
    assert reason in unsupported_reason(model, config)
    assert unsupported_reason(model, GenerationConfig(max_new_tokens=4, pad_token_id=0, do_sample=True)) is None


def test_trainer_rollout_is_the_same_with_and_without_dropping_rows(greedy_training_step):
    """Greedy rollouts of the trainer: the same completions, rewards and loss whichever engine decodes them."""
    (dropped, dropped_log, _), (kept, kept_log, _) = (
        greedy_training_step(drop_finished_rows=drop, max_completion_length=8) for drop in (True, False)
    )
    assert torch.equal(dropped.completion_ids, kept.completion_ids) and dropped.completion_mask.sum() > 0
    for key in ("loss", "reward", "completions/mean_length"):
        assert dropped_log[key] == pytest.approx(kept_log[key], rel=1e-5, abs=1e-7), key
