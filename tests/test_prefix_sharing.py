"""Prefix-shared rollouts and scoring give what the plain path gives: the same greedy tokens, the same log-probs,
entropies and gradients (fp32, 1e-5); and they fall back to the plain path, with one warning, when they cannot share."""

import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicLayer

from grpo_ext import prefix_sharing
from grpo_ext.logprobs import CompletionScores, completion_logps_and_entropies
from grpo_ext.prefix_sharing import generate_with_shared_prefix, shared_prefix_logps, unique_prompts
from grpo_ext.testing import TINY_ARCHITECTURES, make_tiny_model

G = 3
PROMPTS = ["1+2=", "hello world 12", "7", "(3*4)-5=?"]  # different lengths: left padding, one single-token prompt
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and does not stall waiting for a core other tests keep busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(prefix_sharing, "_WARNED", set())  # each test sees its own first fallback warning


@contextmanager
def no_fallback():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if "Prefix sharing is off" in str(w.message)]


def _prompts(tokenizer):
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return encoded["input_ids"], encoded["attention_mask"]  # (B, P)


def _greedy(tokenizer, max_new_tokens=8, **overrides):
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return GenerationConfig(eos_token_id=tokenizer.eos_token_id, **{**settings, **overrides})


def _plain_generate(model, prompt_ids, prompt_mask, generation_config):
    sequences = model.generate(
        input_ids=prompt_ids.repeat_interleave(G, 0),
        attention_mask=prompt_mask.repeat_interleave(G, 0),
        generation_config=generation_config,
    )
    return sequences[:, prompt_ids.size(1) :]  # (B*G, C)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)  # random adapters: the reference (adapters off) differs from the policy


def _four_bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from grpo_ext.models import four_bit_config, keep_4bit_weights_trainable
    from grpo_ext.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=four_bit_config(torch.float32))
    return keep_4bit_weights_trainable(model)  # as the trainer does


# --- Generation ---


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_greedy_generation_is_token_identical(tokenizer, architecture):
    model = make_tiny_model(architecture, tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    with no_fallback():
        shared = generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, _greedy(tokenizer))
    assert shared.shape == (len(PROMPTS) * G, 8)
    assert torch.equal(shared, _plain_generate(model, prompt_ids, prompt_mask, _greedy(tokenizer)))


@pytest.mark.parametrize("model_kind", ["lora", "4bit"])
def test_greedy_generation_is_token_identical_for_lora_and_4bit(tokenizer, tmp_path, model_kind):
    model = _lora(make_tiny_model("qwen2", tokenizer)) if model_kind == "lora" else _four_bit(tmp_path)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    with no_fallback():
        shared = generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, _greedy(tokenizer))
    assert torch.equal(shared, _plain_generate(model, prompt_ids, prompt_mask, _greedy(tokenizer)))


def test_sampling_with_the_same_seed_gives_the_same_completions(tokenizer):
    """Decoding draws the same random numbers with and without sharing: turning it on does not change a run."""
    model = make_tiny_model("qwen2", tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    config = _greedy(tokenizer, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(1)
    with no_fallback():
        shared = generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, config)
    torch.manual_seed(1)
    assert torch.equal(shared, _plain_generate(model, prompt_ids, prompt_mask, config))
    assert len({tuple(row) for row in shared[:G].tolist()}) > 1  # sampled: a group's completions differ


def test_unique_prompts_needs_whole_groups(tokenizer):
    prompt_ids, prompt_mask = _prompts(tokenizer)
    repeated_ids, repeated_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    unique_ids, unique_mask = unique_prompts(repeated_ids, repeated_mask, G)
    assert torch.equal(unique_ids, prompt_ids) and torch.equal(unique_mask, prompt_mask)
    assert unique_prompts(repeated_ids[1:], repeated_mask[1:], G) is None  # a group cut in two
    assert unique_prompts(repeated_ids, repeated_mask, G + 1) is None


# --- Scoring ---


def _batch(tokenizer, group_sizes=None, completion_length=7):
    """Repeated prompts `(N, P)`; completions `(N, C)` of which some end early and one is masked entirely."""
    prompt_ids, prompt_mask = _prompts(tokenizer)
    sizes = torch.tensor(group_sizes or [G] * len(PROMPTS))
    prompt_ids = prompt_ids[: len(sizes)].repeat_interleave(sizes, 0)
    prompt_mask = prompt_mask[: len(sizes)].repeat_interleave(sizes, 0)
    generator = torch.Generator().manual_seed(0)
    completion_ids = torch.randint(4, len(tokenizer), (prompt_ids.size(0), completion_length), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0  # ended early
    completion_mask[4, 1:] = 0  # EOS first
    completion_mask[-1] = 0  # masked out (mask_truncated_completions)
    weights = torch.randn(completion_ids.shape, generator=generator)  # an arbitrary loss of the log-probs
    return prompt_ids, prompt_mask, completion_ids, completion_mask, weights


def _score_both_ways(model, batch, parameters=(), temperature=0.7, chunk_size=5):
    """(log-probs, entropies, gradients) of the plain path and of the prefix-shared path."""
    prompt_ids, prompt_mask, completion_ids, completion_mask, weights = batch
    plain = completion_logps_and_entropies(
        model,
        torch.cat([prompt_ids, completion_ids], 1),
        torch.cat([prompt_mask, completion_mask], 1),
        completion_ids.size(1),
        temperature,
        chunk_size,
    )
    shared = shared_prefix_logps(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, chunk_size
    )
    results = []
    for logps, entropies in (plain, shared):
        gradients = torch.autograd.grad((logps * weights).sum(), parameters) if parameters else ()
        results.append((logps, entropies, gradients))
    return results


def _assert_same(plain, shared):
    (logps, entropies, gradients), (shared_logps, shared_entropies, shared_gradients) = plain, shared
    torch.testing.assert_close(shared_logps, logps, **TOLERANCE)
    torch.testing.assert_close(shared_entropies, entropies, **TOLERANCE)
    for gradient, shared_gradient in zip(gradients, shared_gradients, strict=True):
        torch.testing.assert_close(shared_gradient, gradient, **TOLERANCE)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_scoring_equals_plain_with_gradients(tokenizer, architecture, attention):
    model = make_tiny_model(architecture, tokenizer)
    model.set_attn_implementation(attention)
    batch = _batch(tokenizer)
    with no_fallback():
        plain, shared = _score_both_ways(model, batch, list(model.parameters()))
    _assert_same(plain, shared)
    assert (shared[0][-1] == 0).all() and (shared[0][1, 4:] == 0).all()  # zeros where the completion is padding


def test_groups_cut_by_micro_batches_still_share(tokenizer):
    """A micro-batch may hold part of a group: runs of identical prompts of any length share."""
    model = make_tiny_model("llama", tokenizer)
    batch = _batch(tokenizer, group_sizes=(2, 3, 1, 2))
    with no_fallback():
        plain, shared = _score_both_ways(model, batch, list(model.parameters()))
    _assert_same(plain, shared)


def test_lora_policy_and_disabled_adapter_reference(tokenizer):
    model = _lora(make_tiny_model("qwen2", tokenizer))
    batch = _batch(tokenizer)
    adapters = [p for p in model.parameters() if p.requires_grad]
    with no_fallback():
        _assert_same(*_score_both_ways(model, batch, adapters))  # policy pass, gradients into the adapters
        with model.disable_adapter():  # reference pass
            plain, shared = _score_both_ways(model, batch)
    _assert_same(plain, shared)
    policy_logps = _score_both_ways(model, batch)[1][0]
    assert not torch.allclose(policy_logps, shared[0])  # the adapters really were off


def test_gradient_checkpointing_in_training_mode(tokenizer):
    """Non-reentrant checkpointing replays layers in the backward; the shared prompt cache must read the same."""
    model = _lora(make_tiny_model("qwen2", tokenizer))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    adapters = [p for p in model.parameters() if p.requires_grad]
    with no_fallback():
        plain, shared = _score_both_ways(model, _batch(tokenizer), adapters)
    _assert_same(plain, shared)


def test_qlora_with_gradient_checkpointing(tokenizer, tmp_path):
    """The QLoRA recipe: 4-bit base, LoRA adapters, checkpointing; policy gradients and the adapter-off reference."""
    from peft import LoraConfig

    from grpo_ext.models import apply_peft

    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = apply_peft(_four_bit(tmp_path), config, gradient_checkpointing=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _batch(tokenizer)
    with no_fallback():
        _assert_same(*_score_both_ways(model, batch, [p for p in model.parameters() if p.requires_grad]))
        with torch.no_grad(), model.disable_adapter():
            _assert_same(*_score_both_ways(model, batch))


# --- Fallbacks: plain path, one warning ---


def test_unexpandable_cache_falls_back_with_one_warning(tokenizer, monkeypatch):
    def cannot_repeat(self, indices):
        raise NotImplementedError("this cache keeps one row per prompt")

    monkeypatch.setattr(DynamicLayer, "batch_select_indices", cannot_repeat)  # how cache_rows repeats a KV row
    model = make_tiny_model("qwen2", tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    with pytest.warns(UserWarning, match="cannot be expanded"):
        shared = generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, _greedy(tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, _greedy(tokenizer))
    assert torch.equal(shared, _plain_generate(model, prompt_ids, prompt_mask, _greedy(tokenizer)))


def test_static_cache_falls_back(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    config = _greedy(tokenizer, cache_implementation="static")
    with pytest.warns(UserWarning, match="cache_implementation='static'"):
        shared = generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, config)
    assert torch.equal(shared, _plain_generate(model, prompt_ids, prompt_mask, config))


def test_sliding_window_model_shares_in_generation_and_falls_back_in_scoring(tokenizer, monkeypatch):
    monkeypatch.setattr(prefix_sharing, "_WARNED", set())
    model = make_tiny_model("qwen2", tokenizer, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a window's keys/values are a row of state, repeated whole
        generated = generate_with_shared_prefix(model, prompt_ids, prompt_mask, G, _greedy(tokenizer))
    assert torch.equal(generated, _plain_generate(model, prompt_ids, prompt_mask, _greedy(tokenizer)))
    with pytest.warns(UserWarning, match="sliding"):  # a completion token must not see the whole prompt
        plain, shared = _score_both_ways(model, _batch(tokenizer))
    _assert_same(plain, shared)


def test_reentrant_checkpointing_falls_back(tokenizer):
    model = make_tiny_model("qwen2", tokenizer)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.warns(UserWarning, match="reentrant"):  # (reentrant checkpointing refuses autograd.grad: values only)
        plain, shared = _score_both_ways(model, _batch(tokenizer))
    _assert_same(plain, shared)


def test_architecture_failing_the_self_check_falls_back(tokenizer, monkeypatch):
    """An architecture that looks supported but scores differently through the cache is caught once, up front."""
    original = prefix_sharing._shared_prefix_forward

    def off_by_one(causal_lm, prompt_ids, prompt_mask, request):
        scores = original(causal_lm, prompt_ids, prompt_mask, request)
        return CompletionScores(logps=scores.logps + 1.0, entropies=scores.entropies)

    monkeypatch.setattr(prefix_sharing, "_shared_prefix_forward", off_by_one)
    model = make_tiny_model("qwen2", tokenizer)
    with pytest.warns(UserWarning, match="differ from the plain path"):
        plain, shared = _score_both_ways(model, _batch(tokenizer))
    _assert_same(plain, shared)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_trainer_step_is_the_same_with_and_without_prefix_sharing(tmp_path, make_args, loss_type):
    """Same seed: the same sampled completions, advantages and SGD update whether prompts are shared or not."""
    from grpo_ext import GRPOExtTrainer
    from grpo_ext.testing import (
        digit_fraction_reward,
        make_prompt_dataset,
        make_tokenizer,
        record_trained_batches,
        save_tiny_model,
    )

    model_path = save_tiny_model(tmp_path / "model")

    def one_step(prefix_sharing):
        args = make_args(
            prefix_sharing=prefix_sharing, loss_type=loss_type, max_steps=1, optim="sgd", learning_rate=1.0,
            max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.04,
        )  # fmt: skip
        trainer = GRPOExtTrainer(
            model_path, digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
            processing_class=make_tokenizer(),
        )  # fmt: skip
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trained = record_trained_batches(trainer)
        trainer.train()
        (batch,) = trained
        update = {name: before[name] - p.detach() for name, p in trainer.model.named_parameters()}
        return batch, update, trainer.state.log_history[0]

    shared_batch, shared_update, shared_log = one_step(True)
    plain_batch, plain_update, plain_log = one_step(False)
    torch.testing.assert_close(shared_batch.completion_ids, plain_batch.completion_ids, rtol=0, atol=0)
    torch.testing.assert_close(shared_batch.advantages, plain_batch.advantages)
    assert max(u.abs().max().item() for u in plain_update.values()) > 1e-4
    for name in plain_update:
        torch.testing.assert_close(shared_update[name], plain_update[name], atol=2e-6, rtol=1e-4, msg=name)
    for key in ("loss", "kl", "entropy", "reward"):
        assert shared_log[key] == pytest.approx(plain_log[key], rel=1e-4, abs=1e-6), key
