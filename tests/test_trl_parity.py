"""The loss equals trl.GRPOTrainer's on the same batch, computed by calling TRL here (not copied numbers)."""

from unittest.mock import patch

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from grpo_ext import GRPOExtTrainer
from grpo_ext.rollout import Rollout
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, save_tiny_model

TRL_SETTINGS = dict(bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True)
VISION_TOWERS = ("model.visual.", "model.vision_tower.", "model.vision_model.")  # each family's image encoder


def _batch(tokenizer, seed=0):
    """Left-padded prompts, completions with an EOS in the middle, old/ref log-probs and advantages off-policy."""
    generator = torch.Generator().manual_seed(seed)
    prompts = tokenizer(["1+2=", "33+4=", "5*6=", "7="], return_tensors="pt", padding=True, padding_side="left")
    completion_ids = torch.randint(4, 80, (4, 5), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    noise = lambda: 0.3 * torch.randn(4, 5, generator=generator)  # noqa: E731
    return {
        "prompt_ids": prompts["input_ids"],
        "prompt_mask": prompts["attention_mask"],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.4, 0.9, -1.7]),
        "_old_noise": noise(),
        "_ref_noise": noise(),
    }


def _trainers(tmp_path, make_args, tokenizer, **settings):
    model = save_tiny_model(tmp_path / "model")  # a path: TRL loads its reference model from it
    common = dict(
        epsilon=0.2,
        epsilon_high=0.28,
        temperature=0.7,
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=5,
        use_bias_correction_kl=False,
    )
    common.update(settings)
    dataset = make_prompt_dataset(8)
    trl_args = GRPOConfig(output_dir=str(tmp_path / "trl"), **common, **TRL_SETTINGS)
    trl_trainer = GRPOTrainer(
        model, digit_fraction_reward, args=trl_args, train_dataset=dataset, processing_class=tokenizer
    )
    ours = GRPOExtTrainer(
        model,
        digit_fraction_reward,
        args=make_args(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trl_trainer, ours


# Every metric either trainer may log for the objective; each one TRL logs must be logged, equal, by grpo-ext.
OBJECTIVE_METRICS = (
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "cispo_clip_ratio",
    "vespo/phi_seq_mean",
    "entropy_coef",
)


def _assert_same_loss_and_gradient(tmp_path, make_args, tokenizer, **settings):
    trl_trainer, ours = _trainers(tmp_path, make_args, tokenizer, **settings)
    batch = _batch(tokenizer)
    with torch.no_grad():  # old and ref log-probs near the model's own, so some ratios clip and some do not
        logps = ours._completion_logps(ours.model, batch)
    inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
    inputs["old_per_token_logps"] = logps + batch["_old_noise"]
    inputs["ref_per_token_logps"] = logps + batch["_ref_noise"]
    num_tokens = float(batch["completion_mask"].sum())

    trl_trainer.model.train()
    trl_trainer.current_gradient_accumulation_steps = 1
    trl_loss = trl_trainer._compute_loss(trl_trainer.model, {**inputs, "num_items_in_batch": torch.tensor(num_tokens)})
    trl_loss.backward()

    ours.model.train()
    ours.current_gradient_accumulation_steps = 1
    our_inputs = {**inputs, "num_sequences": 4.0, "num_tokens": num_tokens, "num_tokens_per_process": num_tokens}
    our_loss = ours.compute_loss(ours.model, our_inputs)
    our_loss.backward()

    assert abs(our_loss.item() - trl_loss.item()) < 1e-6, (our_loss.item(), trl_loss.item())
    assert abs(our_loss.item()) > 1e-3  # a real, non-trivial loss was compared
    for (name, ours_param), trl_param in zip(ours.model.named_parameters(), trl_trainer.model.parameters()):
        torch.testing.assert_close(ours_param.grad, trl_param.grad, atol=1e-6, rtol=1e-4, msg=name)
    # The same statistics under the same names
    trl_metrics, our_metrics = trl_trainer._metrics["train"], ours.recorder.values["train"]
    compared = [key for key in OBJECTIVE_METRICS if key in trl_metrics]
    assert "kl" in compared
    for key in compared:
        assert our_metrics[key][-1] == pytest.approx(trl_metrics[key][-1], abs=1e-6), key
    return compared


@pytest.mark.parametrize(
    "loss_type, importance_sampling_level",
    [
        *[(loss_type, level) for loss_type in ("grpo", "dapo", "dr_grpo", "bnpo") for level in ("token", "sequence")],
        ("cispo", "token"),
        ("cispo", "sequence"),
        ("sapo", "token"),
        ("sapo", "sequence"),
        ("luspo", "sequence"),
        ("vespo", "token"),
    ],
)
def test_loss_and_gradient_match_trl(tmp_path, make_args, tokenizer, loss_type, importance_sampling_level):
    settings = dict(loss_type=loss_type, importance_sampling_level=importance_sampling_level, beta=0.04)
    if loss_type == "cispo":
        settings["epsilon_high"] = 1.1  # the weight's cap: some tokens above it, some below
    compared = _assert_same_loss_and_gradient(tmp_path, make_args, tokenizer, **settings)
    expected = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean", "sapo": "kl"}
    assert expected.get(loss_type, "clip_ratio/region_mean") in compared


@pytest.mark.parametrize(
    "settings",
    [
        # two-sided clipping, bias-corrected KL, off-policy sequence mask (drops row 1: A < 0, mean KL 0.008)
        dict(loss_type="grpo", delta=1.5, use_bias_correction_kl=True, off_policy_mask_threshold=0.005),
        # high-entropy tokens only, with a static entropy bonus on them
        dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.1),
    ],
    ids=["delta-biaskl-offpolicy", "entropy-quantile-bonus"],
)
def test_loss_options_match_trl(tmp_path, make_args, tokenizer, settings):
    compared = _assert_same_loss_and_gradient(tmp_path, make_args, tokenizer, beta=0.04, **settings)
    if "entropy_coef" in settings:
        assert "entropy_coef" in compared


def _one_step_each(tmp_path, make_args, tokenizer, completions):
    """TRL's trainer and grpo-ext's, each one optimizer step on the same scripted completions (TRL's settings, one
    group of 3, `mask_truncated_completions=True`): generation goes through `model.generate`, patched as TRL's tests
    patch it (grpo-ext's own decoding loop, `drop_finished_rows`, is off so that the patch applies). Returns both
    trainers and the weights they started from."""

    def generate(self, input_ids=None, **kwargs):
        return torch.cat([input_ids, torch.tensor(completions, device=input_ids.device)], 1)

    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    model = save_tiny_model(tmp_path / "model")
    initial = [p.detach().clone() for p in AutoModelForCausalLM.from_pretrained(model).parameters()]
    common = dict(
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=8,
        mask_truncated_completions=True,
        loss_type="dapo",
        beta=0.0,
        temperature=1.0,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        optim="sgd",  # the step is the clipped gradient itself (Adam's first step would be its sign)
        max_grad_norm=1.0,
        max_steps=1,
        logging_steps=1,
        seed=0,
        save_strategy="no",
    )
    dataset = make_prompt_dataset(4)
    trainers = []
    with patch("transformers.generation.utils.GenerationMixin.generate", generate):
        for trainer_class, args in [
            (GRPOTrainer, GRPOConfig(output_dir=str(tmp_path / "trl"), **common, **TRL_SETTINGS)),
            (GRPOExtTrainer, make_args(drop_finished_rows=False, **common)),
        ]:
            trainer = trainer_class(model, length, args=args, train_dataset=dataset, processing_class=tokenizer)
            trainer.train()
            trainers.append(trainer)
    return (*trainers, initial)


def test_mask_truncated_completions_as_trl(tmp_path, make_args, tokenizer):
    """TRL's case (test_training_with_mask_truncated_completions): a completion cut at max_completion_length is out
    of the loss; one that ended early and one that ended on its last allowed token are in it. The step moves every
    weight, exactly as TRL's does."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    completions = [list(range(5, 13)), [13, 14, 15, eos, pad, pad, pad, pad], [*range(16, 23), eos]]
    trl_trainer, ours, initial = _one_step_each(tmp_path, make_args, tokenizer, completions)

    for trainer in (trl_trainer, ours):
        assert trainer.state.log_history[0]["completions/clipped_ratio"] == pytest.approx(1 / 3)
    for before, trl_param, our_param in zip(initial, trl_trainer.model.parameters(), ours.model.parameters()):
        assert not torch.equal(our_param, before)
        torch.testing.assert_close(our_param, trl_param, atol=1e-6, rtol=1e-5)


def test_a_completion_cut_on_a_generated_pad_token_is_truncated(tmp_path, make_args, tokenizer):
    """The one difference (README, "Drop-in for TRL"): a completion whose last token, at max_completion_length, is a
    pad token the model generated is truncated here (no stop token ended it: the length did), finished for TRL."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    completions = [[*range(5, 12), pad], [13, 14, 15, eos, pad, pad, pad, pad], list(range(16, 24))]
    trl_trainer, ours, _ = _one_step_each(tmp_path, make_args, tokenizer, completions)
    assert trl_trainer.state.log_history[0]["completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert ours.state.log_history[0]["completions/clipped_ratio"] == pytest.approx(2 / 3)
    rollout = Rollout.of_token_lists([[1]] * 3, [ids[:4] if eos in ids else ids for ids in completions], None, pad,
                                     [eos], mask_truncated_completions=True)  # fmt: skip
    assert rollout.is_truncated.tolist() == [True, False, True]
    assert rollout.completion_mask.sum(1).tolist() == [0, 4, 0]


@pytest.mark.parametrize(
    "architecture, loss_type",
    [("qwen2_5_vl", "grpo"), ("qwen2_5_vl", "dapo"), ("gemma3", "dapo"), ("idefics3", "dapo"), ("llava", "dapo"),
     ("llava_next", "dapo")],
)  # fmt: skip
def test_vlm_loss_and_gradient_match_trl(tmp_path, make_args, architecture, loss_type):
    """A vision-language model (tiny, 56 x 56 images of 4 tokens each): the same prompts with their images,
    completions, old / reference log-probs and advantages give TRL's loss and gradient. TRL's batch is built as its
    `_generate_and_score_completions` builds it (the processor over the whole batch, `padding=True`; its token types
    extended with zeros over the completion: `pixel_values`, `image_grid_thw`, `mm_token_type_ids`, `token_type_ids`,
    `pixel_attention_mask`, `image_sizes` as the architecture has them); grpo-ext's prompts are encoded by its own engine, row by row, and must
    come out the same."""
    from grpo_ext.rollout import encode_image_prompts
    from grpo_ext.testing import make_image_dataset, make_tiny_vlm
    from grpo_ext.vision import with_images

    model, processor = make_tiny_vlm(architecture, image_size=56)
    path = str(tmp_path / "vlm")
    model.save_pretrained(path)  # a path: TRL loads its reference model from it
    dataset = make_image_dataset(8, image_size=56)
    common = dict(
        loss_type=loss_type, beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=0.7, num_generations=4,
        per_device_train_batch_size=4, max_completion_length=5, use_bias_correction_kl=False,
    )  # fmt: skip
    trl_args = GRPOConfig(output_dir=str(tmp_path / "trl"), **common, **TRL_SETTINGS)
    trl_trainer = GRPOTrainer(path, digit_fraction_reward, args=trl_args, train_dataset=dataset, processing_class=processor)  # fmt: skip
    ours = GRPOExtTrainer(path, digit_fraction_reward, args=make_args(**common), train_dataset=dataset,
                          processing_class=processor)  # fmt: skip

    rows = [dataset[i] for i in (0, 1, 2, 3)]  # four prompts with different images (and colours)
    prompts = with_images([row["prompt"] for row in rows], rows)
    texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    images = [[row["image"]] for row in rows]
    trl_prompt = processor(images=images, text=texts, padding=True, return_tensors="pt")
    prompt_ids, prompt_mask, vision = encode_image_prompts(processor, prompts, None, None, "cpu")
    assert torch.equal(prompt_ids, trl_prompt["input_ids"]) and torch.equal(prompt_mask, trl_prompt["attention_mask"])

    batch = _batch(processor.tokenizer)
    batch.update(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    with torch.no_grad():  # old and ref log-probs near the model's own, so some ratios clip and some do not
        logps = ours._completion_logps(ours.model, {**batch, "vision": vision})
    inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
    inputs["old_per_token_logps"] = logps + batch["_old_noise"]
    inputs["ref_per_token_logps"] = logps + batch["_ref_noise"]
    num_tokens = float(batch["completion_mask"].sum())
    C = batch["completion_ids"].size(1)
    trl_images = {k: v for k, v in trl_prompt.items() if k not in ("input_ids", "attention_mask")}
    for key in {"token_type_ids", "mm_token_type_ids"} & set(trl_images):
        trl_images[key] = torch.cat([trl_images[key], torch.zeros(4, C, dtype=torch.long)], 1)
    trl_images["num_images"] = [1] * 4

    trl_trainer.model.train()
    trl_trainer.current_gradient_accumulation_steps = 1
    trl_inputs = {**inputs, **trl_images, "num_items_in_batch": torch.tensor(num_tokens)}
    trl_loss = trl_trainer._compute_loss(trl_trainer.model, trl_inputs)
    trl_loss.backward()

    ours.model.train()
    ours.current_gradient_accumulation_steps = 1
    our_inputs = {**inputs, "vision": vision, "num_sequences": 4.0, "num_tokens": num_tokens,
                  "num_tokens_per_process": num_tokens}  # fmt: skip
    our_loss = ours.compute_loss(ours.model, our_inputs)
    our_loss.backward()

    assert abs(our_loss.item() - trl_loss.item()) < 1e-6, (our_loss.item(), trl_loss.item())
    assert abs(our_loss.item()) > 1e-3
    for (name, ours_param), trl_param in zip(ours.model.named_parameters(), trl_trainer.model.parameters()):
        torch.testing.assert_close(ours_param.grad, trl_param.grad, atol=1e-6, rtol=1e-4, msg=name)
    vision_grads = [p.grad for name, p in ours.model.named_parameters() if name.startswith(VISION_TOWERS)]
    assert any(grad is not None and grad.abs().sum() > 0 for grad in vision_grads)  # the images are in the gradient
    assert ours.recorder.values["train"]["kl"][-1] == pytest.approx(trl_trainer._metrics["train"]["kl"][-1], abs=1e-6)
