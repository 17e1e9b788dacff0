"""The architecture matrix: each model family transformers builds offline, tiny and with random weights, through the
rollout. The plan names each path a family cannot take; greedy completions equal `generate`'s on every generation
path (finished rows dropped, each prompt prefilled once per group, both); scored log-probs equal the model's own
logits and the plain path's; one training step runs. `PATHS` is README's "Architectures" table."""

import itertools
import warnings

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    STATIC_LAYER_TYPE_MAPPING,
    DynamicCache,
    LinearAttentionLayer,
    QuantizedLayer,
)

from grpo_ext import GRPOExtTrainer, cache_rows, prefix_sharing
from grpo_ext.decoding import generate_dropping_finished
from grpo_ext.logprobs import check_against_full_logits
from grpo_ext.rollout import Rollout, plan_generation, score_rollout
from grpo_ext.testing import FAMILIES, make_prompt_dataset, make_tiny_model

G = 4
SHARED, DROPPED, GENERATE, PLAIN = "shared", "dropped rows", "generate", "plain"

# family -> (decoding, prompt prefill in generation, scoring): what plan_generation picks with prefix_sharing and
# drop_finished_rows on. Recurrent and sliding-window layers share the prompt in generation (their state is repeated
# whole) but are scored on the plain path.
PATHS = {
    "llama": (DROPPED, SHARED, SHARED),
    "qwen2": (DROPPED, SHARED, SHARED),
    "qwen3": (DROPPED, SHARED, SHARED),
    "qwen3_moe": (DROPPED, SHARED, SHARED),
    "glm4_moe": (DROPPED, SHARED, SHARED),
    "gemma2": (DROPPED, SHARED, PLAIN),
    "gemma3": (DROPPED, SHARED, PLAIN),
    "cohere2": (DROPPED, SHARED, PLAIN),
    "gpt_oss": (DROPPED, SHARED, PLAIN),
    "nemotron_h": (DROPPED, SHARED, PLAIN),
    "qwen3_5": (DROPPED, SHARED, PLAIN),
    "qwen3_5_moe": (DROPPED, SHARED, PLAIN),
    "qwen3_next": (DROPPED, SHARED, PLAIN),
    "falcon_h1": (DROPPED, SHARED, PLAIN),
    "jamba": (DROPPED, SHARED, PLAIN),
    "granitemoehybrid": (DROPPED, SHARED, PLAIN),
    "bamba": (DROPPED, SHARED, PLAIN),
    "lfm2": (DROPPED, SHARED, PLAIN),
    "mamba": (DROPPED, SHARED, PLAIN),
    "minimax": (GENERATE, PLAIN, PLAIN),  # a cache class of its own
}
# One family per kind of layer runs in `make test`; the rest with `make test-all`.
FAST = {"qwen3_5", "nemotron_h", "gemma3"}


def _families(fast=FAST):
    return [family if family in fast else pytest.param(family, marks=pytest.mark.slow) for family in PATHS]


def _model(family, tokenizer):
    architecture_known = family in FAMILIES or family in ("qwen2", "llama")
    if not architecture_known:
        pytest.skip(f"no tiny config for {family}")
    try:
        return make_tiny_model(family, tokenizer).eval()
    except ModuleNotFoundError as error:  # a transformers without this family
        pytest.skip(str(error))


def _greedy(tokenizer, eos):
    return GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)


def _prompts(tokenizer):
    encoded = tokenizer(["1+2=", "33+4=", "5*6=", "7="], return_tensors="pt", padding=True, padding_side="left")
    return encoded["input_ids"].repeat_interleave(G, 0), encoded["attention_mask"].repeat_interleave(G, 0)  # (16, P)


def _stops_at_uneven_steps(model, tokenizer, prompt_ids, prompt_mask) -> GenerationConfig:
    """Greedy settings with stop tokens that end the groups after the most different numbers of tokens. Candidates
    are tokens of the free-running completions; each pair's lengths follow from those completions (greedy decoding up
    to a stop token is a prefix of the free run)."""
    eos = tokenizer.eos_token_id
    free = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=_greedy(tokenizer, eos))
    free = free[:, prompt_ids.size(1) :]  # (16, C)

    def distinct_lengths(stops) -> int:
        is_stop = torch.isin(free, torch.tensor([eos, *stops]))
        return len(set(torch.where(is_stop.any(1), is_stop.int().argmax(1), free.size(1)).tolist()))

    candidates = sorted(set(free[::G, 1:9].flatten().tolist()) - {eos, tokenizer.pad_token_id})
    best = max(itertools.combinations(candidates, 2), key=distinct_lengths)
    return _greedy(tokenizer, [eos, *best])


@pytest.mark.parametrize("family", PATHS)
def test_the_plan_takes_the_listed_paths_and_names_each_fallback(tokenizer, family):
    model = _model(family, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_generation(model, _greedy(tokenizer, [tokenizer.eos_token_id]), True, True)
    decoding, prefill, scoring = PATHS[family]
    assert plan.drop_finished_rows == (decoding == DROPPED)
    assert plan.shared_prefill == (prefill == SHARED)
    assert plan.shared_prefix == (scoring == SHARED)
    messages = [str(w.message) for w in caught]
    name = type(model).__name__
    if scoring == PLAIN:  # one warning naming the model and the layer type
        assert any(m.startswith("Prefix sharing is off") and name in m and "layers" in m for m in messages)
    if decoding == GENERATE:
        assert any(m.startswith("Finished rows are not dropped") and name in m for m in messages)


@pytest.mark.parametrize("family", _families(fast={"qwen3_5", "nemotron_h"}))
def test_greedy_completions_equal_generate_on_every_path(tokenizer, family):
    model = _model(family, tokenizer)
    if PATHS[family][0] == GENERATE:
        pytest.skip(f"{family} generates with model.generate")
    prompt_ids, prompt_mask = _prompts(tokenizer)
    config = _stops_at_uneven_steps(model, tokenizer, prompt_ids, prompt_mask)
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    expected = expected[:, prompt_ids.size(1) :]
    assert len(set((expected != 0).sum(1).tolist())) >= 2  # rows really leave the batch at different steps
    unique_ids, unique_mask = prefix_sharing.unique_prompts(prompt_ids, prompt_mask, G)

    def shared_cache():  # each prompt's state prefilled once, repeated G times
        return prefix_sharing.shared_prompt_cache(model, unique_ids, unique_mask, G)

    assert torch.equal(generate_dropping_finished(model, prompt_ids, prompt_mask, config), expected)
    dropped_shared = generate_dropping_finished(model, prompt_ids, prompt_mask, config, cache=shared_cache())
    assert torch.equal(dropped_shared, expected)
    generated_shared = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, cache=shared_cache()
    )
    assert torch.equal(generated_shared[:, prompt_ids.size(1) :], expected)


def _rollout(tokenizer, shared_prefix):
    prompts = tokenizer(["1+2=", "33+4="], return_tensors="pt", padding=True, padding_side="left")
    completion_ids = torch.tensor([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 15], [13, 14, 0, 0, 0]])
    completion_mask = (completion_ids != 0).long()
    return Rollout(
        prompts["input_ids"].repeat_interleave(2, 0), prompts["attention_mask"].repeat_interleave(2, 0),
        completion_ids, completion_mask, lengths=completion_mask.sum(1), is_truncated=torch.zeros(4, dtype=torch.bool),
        shared_prefix=shared_prefix, advantages=torch.ones(4),
    )  # fmt: skip


@pytest.mark.parametrize("family", _families())
def test_log_probs_equal_the_models_logits_and_the_plain_path(tokenizer, family):
    model = _model(family, tokenizer)
    check_against_full_logits(model)  # the chunked LM head reproduces the model's own logits (scales, soft-caps)
    plain = score_rollout(model, _rollout(tokenizer, False), 1.0, 3)
    shared_prefix = prefix_sharing.unsupported_reason(model) is None
    assert shared_prefix == (PATHS[family][2] == SHARED)
    if not shared_prefix:
        return  # scored on the plain path: nothing else to compare
    shared = score_rollout(model, _rollout(tokenizer, True), 1.0, 3)
    torch.testing.assert_close(shared.logps, plain.logps, atol=1e-5, rtol=1e-5)


def _text_checksum(completions, **kwargs) -> list[float]:
    """A reward that differs between sampled completions, so every group has advantages and the step an update."""
    return [float(sum(map(ord, text)) % 7) for text in completions]


@pytest.mark.parametrize("family", _families(fast={"qwen3_5", "nemotron_h", "falcon_h1"}))
def test_one_training_step(tokenizer, make_args, family):
    """prefix_sharing and drop_finished_rows asked for: each family trains on what its plan allows."""
    model = _model(family, tokenizer).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = make_args(
        max_steps=1, per_device_train_batch_size=4, num_generations=2, max_completion_length=4, prefix_sharing=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's fallbacks, asserted above
        trainer = GRPOExtTrainer(
            model, _text_checksum, args=args, train_dataset=make_prompt_dataset(4), processing_class=tokenizer
        )
        trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


# --- The cache-layer table ---


def test_every_dynamic_cache_layer_type_has_a_row_rule_and_static_ones_a_reason():
    for layer_type, layer_class in DYNAMIC_LAYER_TYPE_MAPPING.items():
        assert callable(cache_rows.rule_for(layer_class)), layer_type
    for layer_type, layer_class in STATIC_LAYER_TYPE_MAPPING.items():
        if not issubclass(layer_class, DYNAMIC_LAYER_TYPE_MAPPING[layer_type]):  # a static layer, not a shared one
            assert "static" in cache_rows.rule_for(layer_class), layer_type
    assert "residual" in cache_rows.rule_for(QuantizedLayer)
    assert "no rule" in cache_rows.rule_for(type("CustomLayer", (), {}))


def test_take_rows_keeps_and_repeats_recurrent_states_and_keys_values():
    layer = LinearAttentionLayer(number_of_states=2)
    conv, recurrent = torch.randn(3, 5, 4), torch.randn(3, 2, 8, 8)
    layer.update_conv_state(conv, state_idx=0)
    layer.update_recurrent_state(recurrent, state_idx=1)
    cache = DynamicCache()
    cache.update(torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8), 0)
    keys = cache.layers[0].keys.clone()
    cache.layers.append(layer)
    index = torch.tensor([2, 2, 0])
    cache_rows.take_rows(cache, index)
    assert torch.equal(layer.conv_states[0], conv[index]) and layer.recurrent_states[0] is None
    assert torch.equal(layer.recurrent_states[1], recurrent[index]) and layer.conv_states[1] is None
    assert torch.equal(cache.layers[0].keys, keys[index])
