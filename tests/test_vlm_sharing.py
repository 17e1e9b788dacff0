"""Prompts with images shared by their group (Qwen2-VL, Qwen2.5-VL): each prompt and its images encoded once per group
in generation and in every scoring pass give what the plain path gives (every row with its own copy of the images):
the same greedy tokens, the same log-probs, entropies and gradients (vision tower included), the same trainer step."""

import warnings

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from grpo_ext import prefix_sharing
from grpo_ext.logprobs import ScoringRequest, score_completions
from grpo_ext.prefix_sharing import SharedPrefixScoring, prompt_groups
from grpo_ext.rollout import GenerationPlan, encode_image_prompts, generate_completions, plan_generation
from grpo_ext.testing import make_image_dataset, make_tiny_vlm

SHARING_ARCHITECTURES = ("qwen2_5_vl", "qwen2_vl")  # the families whose image prompts are shared per group

G = 3
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(prefix_sharing, "_WARNED", set())


def _prompt(text, size, colour):
    image = Image.new("RGB", size, colour)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


# Different image sizes and texts: prompts of different lengths (left padding), images of different grids. The last
# two have the same text and image size, so the same token ids: only their images tell their groups apart.
PROMPTS = [
    ("1+2=", (56, 56), (255, 0, 0)),
    ("what colour?", (28, 56), (0, 255, 0)),
    ("7", (84, 56), (0, 0, 255)),
    ("7", (84, 56), (255, 255, 0)),
]


def _encoded(processor, group_sizes=None):
    """Prompt ids and mask `(N, P)` and `VisionInputs`, each prompt repeated `group_sizes[i]` times (G by default)."""
    sizes = group_sizes or [G] * len(PROMPTS)
    prompts = [_prompt(*spec) for spec, n in zip(PROMPTS, sizes, strict=False) for _ in range(n)]
    return encode_image_prompts(processor, prompts, None, None, torch.device("cpu"))


def _greedy(processor, max_new_tokens=8):
    tokenizer = processor.tokenizer
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def _count_images_encoded(model):
    """A list that receives the number of images of each vision-encoder call."""
    counts = []
    model.model.visual.register_forward_hook(lambda module, args, kwargs, out: counts.append(len(kwargs["grid_thw"])), with_kwargs=True)  # fmt: skip
    return counts


# --- Generation ---


@pytest.mark.parametrize("architecture", SHARING_ARCHITECTURES)
def test_greedy_generation_equals_generate(architecture):
    """Each prompt prefilled once with its image, decoded by the loop that drops finished rows with the rows' rope
    deltas: the tokens of `model.generate` on every row with its own image."""
    model, processor = make_tiny_vlm(architecture, image_size=84)
    model.eval()
    prompt_ids, prompt_mask, vision = _encoded(processor)
    assert prompt_mask[:, 0].sum() < len(prompt_mask)  # some prompts are left-padded
    config = _greedy(processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        plan = plan_generation(model, config, True, True, images=True)
    assert plan.shared_prefill and plan.drop_finished_rows and plan.shared_prefix
    counts = _count_images_encoded(model)
    shared = generate_completions(model, prompt_ids, prompt_mask, G, config, plan, vision=vision)
    assert counts == [len(PROMPTS)]  # one vision-encoder call, each prompt's image once
    plain = generate_completions(model, prompt_ids, prompt_mask, G, config, GenerationPlan(), vision=vision)
    assert counts[1] == len(PROMPTS) * G  # model.generate encodes every row's image
    assert shared.shape[1] > 1
    assert torch.equal(shared, plain)


@pytest.mark.parametrize("architecture", SHARING_ARCHITECTURES)
@torch.no_grad()
def test_prefilled_cache_continues_as_the_full_forward(architecture):
    """The decoding steps after the shared prefill (the last prompt token, then completion tokens, at the mask's
    positions plus each row's rope delta) give the logits of the model's own forward over the whole sequence with
    its images: greedy tokens of a tiny random model hardly notice a wrong position, logits do."""
    from grpo_ext.logprobs import position_ids_from_mask
    from grpo_ext.prefix_sharing import shared_image_prompt_cache, unique_prompts

    model, processor = make_tiny_vlm(architecture, image_size=84)
    model.eval()
    prompt_ids, prompt_mask, vision = _encoded(processor)
    width = prompt_ids.size(1)
    image_inputs = vision.select(slice(0, None, G)).model_inputs(width, 0, "cpu")
    cache, rope_deltas = shared_image_prompt_cache(model, *unique_prompts(prompt_ids, prompt_mask, G), G, image_inputs)
    completion_ids, _, _ = _completions(prompt_ids, 90, length=4)
    mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)  # (N, P + C)
    step_ids = torch.cat([prompt_ids[:, -1:], completion_ids], 1)  # (N, 1 + C): what the cache has not seen
    positions = position_ids_from_mask(mask)[:, width - 1 :] + rope_deltas
    logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache).logits
    full = model(
        input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=mask,
        **vision.model_inputs(width, completion_ids.size(1), "cpu"),
    ).logits[:, width - 1 :]  # fmt: skip
    torch.testing.assert_close(logits, full, **TOLERANCE)


@torch.no_grad()
def test_decoding_positions_are_the_models_own():
    """The positions the decoding loop gives each step are those `get_rope_index` gives the same tokens in a forward
    over prompt and completion with the images (text after the image: all three rotary axes equal)."""
    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=84)
    model.eval()
    prompt_ids, prompt_mask, vision = _encoded(processor)
    config = GenerationConfig(
        max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
    )  # fmt: skip
    seen, forward = [], model.forward
    model.forward = lambda *args, **kwargs: seen.append(kwargs["position_ids"]) or forward(*args, **kwargs)
    plan = plan_generation(model, config, True, True, images=True)
    completion_ids = generate_completions(model, prompt_ids, prompt_mask, G, config, plan, vision=vision)
    decoded_positions = torch.cat(seen, 1)  # (N, 5): the last prompt token, then 4 completion tokens
    width, length = prompt_ids.size(1), completion_ids.size(1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    expected, _ = model.model.get_rope_index(
        torch.cat([prompt_ids, completion_ids], 1), attention_mask=mask, **vision.model_inputs(width, length, "cpu")
    )  # (3, N, P + C)
    assert (expected[:, :, width - 1 :] == expected[:1, :, width - 1 :]).all()
    assert torch.equal(decoded_positions, expected[0, :, width - 1 : -1])


def test_sampling_with_the_same_seed_gives_the_same_completions():
    """With every completion running to max_new_tokens, the loop draws the same random numbers as `generate`."""
    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=84)
    prompt_ids, prompt_mask, vision = _encoded(processor)
    config = GenerationConfig(
        max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=1.0,
        pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id,
    )  # fmt: skip
    plan = plan_generation(model, config, True, True, images=True)
    torch.manual_seed(3)
    shared = generate_completions(model, prompt_ids, prompt_mask, G, config, plan, vision=vision)
    torch.manual_seed(3)
    plain = generate_completions(model, prompt_ids, prompt_mask, G, config, GenerationPlan(), vision=vision)
    assert torch.equal(shared, plain)
    assert len({tuple(row) for row in shared[:G].tolist()}) > 1  # sampled: a group's completions differ


def test_groups_with_different_images_are_not_prefilled_together():
    """Rows of a group of G with different images (same ids) take `generate`, not one prefill for both."""
    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=84)
    prompt_ids, prompt_mask, vision = _encoded(processor, group_sizes=[0, 0, 0, G])  # only the last prompt
    _, _, other = _encoded(processor, group_sizes=[0, 0, G, 0])  # same ids, other colour
    assert torch.equal(prompt_ids, _encoded(processor, group_sizes=[0, 0, G, 0])[0])
    vision.rows[1] = other.rows[1]
    config = _greedy(processor)
    plan = plan_generation(model, config, True, True, images=True)
    counts = _count_images_encoded(model)
    generate_completions(model, prompt_ids, prompt_mask, G, config, plan, vision=vision)
    assert counts == [G]


# --- Scoring ---


def _completions(prompt_ids, tokens, length=7):
    generator = torch.Generator().manual_seed(0)
    completion_ids = torch.randint(4, tokens, (prompt_ids.size(0), length), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0  # ended early
    completion_mask[min(4, len(completion_mask) - 2), 1:] = 0  # EOS first
    completion_mask[-1] = 0  # masked out
    weights = torch.randn(completion_ids.shape, generator=generator)  # an arbitrary loss of the log-probs
    return completion_ids, completion_mask, weights


def _score_both_ways(model, processor, group_sizes=None, temperature=0.7, chunk_size=5):
    """(log-probs, entropies, gradients of every parameter) of the plain pass and of the shared pass."""
    prompt_ids, prompt_mask, vision = _encoded(processor, group_sizes)
    completion_ids, completion_mask, weights = _completions(prompt_ids, 90)
    width = (prompt_ids.size(1), completion_ids.size(1))
    requests = [
        ScoringRequest(completion_ids, completion_mask, temperature, chunk_size, model_inputs=vision.model_inputs(*width, "cpu")),
        SharedPrefixScoring(completion_ids, completion_mask, temperature, chunk_size, vision=vision),
    ]  # fmt: skip
    parameters = [p for p in model.parameters() if p.requires_grad]
    results = []
    for request in requests:
        scores = score_completions(model, prompt_ids, prompt_mask, request)
        gradients = torch.autograd.grad((scores.logps * weights).sum(), parameters, allow_unused=True)
        results.append((scores.logps, scores.entropies, gradients))
    return results


def _assert_same(plain, shared):
    (logps, entropies, gradients), (shared_logps, shared_entropies, shared_gradients) = plain, shared
    torch.testing.assert_close(shared_logps, logps, **TOLERANCE)
    torch.testing.assert_close(shared_entropies, entropies, **TOLERANCE)
    for gradient, shared_gradient in zip(gradients, shared_gradients, strict=True):
        if gradient is None:
            assert shared_gradient is None
        else:
            torch.testing.assert_close(shared_gradient, gradient, **TOLERANCE)


@pytest.mark.parametrize("architecture", SHARING_ARCHITECTURES)
def test_shared_scoring_equals_plain_with_gradients(architecture):
    """Log-probs, entropies and the gradients of every parameter, the vision tower's included; the vision encoder
    runs once per group in the shared pass."""
    model, processor = make_tiny_vlm(architecture, image_size=84)
    counts = _count_images_encoded(model)
    plain, shared = _score_both_ways(model, processor)
    assert counts == [len(PROMPTS) * G, len(PROMPTS)]
    _assert_same(plain, shared)
    visual = [g for (name, _), g in zip(model.named_parameters(), plain[2], strict=True) if "visual" in name]
    assert any(g is not None and g.abs().sum() > 0 for g in visual)  # the images matter to the loss
    assert (shared[0][-1] == 0).all() and (shared[0][1, 4:] == 0).all()


def test_groups_cut_by_micro_batches_and_lora():
    """Runs of any length share (a micro-batch may cut a group); LoRA policy and its disabled-adapter reference."""
    from peft import LoraConfig, get_peft_model

    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=84)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "qkv"], init_lora_weights=False)
    model = get_peft_model(model, config)
    _assert_same(*_score_both_ways(model, processor, group_sizes=[2, 3, 1, 2]))
    with torch.no_grad(), model.disable_adapter():
        prompt_ids, prompt_mask, vision = _encoded(processor)
        completion_ids, completion_mask, _ = _completions(prompt_ids, 90)
        width = (prompt_ids.size(1), completion_ids.size(1))
        plain = ScoringRequest(completion_ids, completion_mask, model_inputs=vision.model_inputs(*width, "cpu"))
        shared = SharedPrefixScoring(completion_ids, completion_mask, vision=vision)
        torch.testing.assert_close(
            score_completions(model, prompt_ids, prompt_mask, shared).logps,
            score_completions(model, prompt_ids, prompt_mask, plain).logps,
            **TOLERANCE,
        )


def test_groups_of_one_take_the_plain_pass():
    """A micro-batch without two rows of one group shares nothing: the plain pass, with each row's images."""
    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=84)
    _assert_same(*_score_both_ways(model, processor, group_sizes=[1, 1, 1, 1]))


def test_runs_split_where_the_images_differ():
    """The last two prompts have the same ids; their images tell the runs apart."""
    _, processor = make_tiny_vlm("qwen2_5_vl", image_size=84)
    prompt_ids, prompt_mask, vision = _encoded(processor)
    starts, sizes = prompt_groups(prompt_ids, prompt_mask, vision)
    assert sizes.tolist() == [G] * len(PROMPTS)
    _, text_sizes = prompt_groups(prompt_ids, prompt_mask)
    assert text_sizes.tolist() == [G, G, 2 * G]


def test_other_vision_models_keep_the_plain_path():
    """A vision-language model outside the Qwen2-VL family is refused, with the reason."""
    model, _ = make_tiny_vlm("qwen2_5_vl")
    model.config.model_type = "llava"  # as another family would report
    reason = prefix_sharing.image_unsupported_reason(model)
    assert "not of a family whose image prompts share" in reason
    with pytest.warns(UserWarning, match="Prefix sharing is off.*llava|not of a family"):
        plan = plan_generation(model, GenerationConfig(max_new_tokens=4), True, True, images=True)
    assert plan == GenerationPlan()


# --- Trainer ---


def distinct_characters(completions, **kwargs):
    return [float(len(set(c[0]["content"]))) for c in completions]


def test_trainer_step_is_the_same_with_and_without_prefix_sharing(tmp_path):
    """Same seed, an image dataset: the same sampled completions, loss and SGD update with the prompts and their images
    shared (one prefill, one vision-encoder pass per group in each scoring pass) or not."""
    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.testing import record_trained_batches

    def one_step(sharing):
        model, processor = make_tiny_vlm("qwen2_5_vl", image_size=56)
        args = GRPOExtConfig(
            output_dir=str(tmp_path / str(sharing)), per_device_train_batch_size=8, num_generations=4,
            max_completion_length=6, generation_kwargs={"min_new_tokens": 6}, max_steps=1, logging_steps=1,
            optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.04,
            prefix_sharing=sharing, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = GRPOExtTrainer(
            model, distinct_characters, args=args, train_dataset=make_image_dataset(8, image_size=56),
            processing_class=processor,
        )  # fmt: skip
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trained = record_trained_batches(trainer)
        trainer.train()
        (batch,) = trained
        update = {name: before[name] - p.detach() for name, p in model.named_parameters()}
        return batch, update, trainer.state.log_history[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared_batch, shared_update, shared_log = one_step(True)
    assert not [
        w for w in caught if "Prefix sharing is off" in str(w.message) or "prefills every row" in str(w.message)
    ]
    plain_batch, plain_update, plain_log = one_step(False)
    assert shared_batch.shared_prefix and not plain_batch.shared_prefix
    torch.testing.assert_close(shared_batch.completion_ids, plain_batch.completion_ids, rtol=0, atol=0)
    torch.testing.assert_close(shared_batch.advantages, plain_batch.advantages)
    assert max(u.abs().max().item() for u in plain_update.values()) > 1e-4
    for name in plain_update:
        torch.testing.assert_close(shared_update[name], plain_update[name], atol=2e-6, rtol=1e-4, msg=name)
    for key in ("loss", "kl", "entropy", "reward"):
        assert shared_log[key] == pytest.approx(plain_log[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("architecture", ["gemma3", "idefics3", "llava", "llava_next"])
def test_other_architectures_keep_the_plain_path_with_a_reason(architecture):
    """Only the families whose positions and image merging the shared passes reproduce share image prompts; the
    others are named with the reason (and their batches take the plain path, tested in test_vlm_architectures.py)."""
    model, _ = make_tiny_vlm(architecture)
    reason = prefix_sharing.image_unsupported_reason(model)
    assert reason is not None and "qwen2_vl, qwen2_5_vl" in reason
    assert prefix_sharing.image_unsupported_reason(make_tiny_vlm("qwen2_5_vl")[0]) is None
