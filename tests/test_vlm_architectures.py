"""Every tiny vision-language architecture of `grpo_ext.testing` trains through TRL's script shape, and the scoring pass
with its processor's tensors (`pixel_values`, `image_grid_thw`, `token_type_ids`, `pixel_attention_mask`,
`image_sizes`...) gives the log-probs of the model's own forward, and of `generate`."""

import pytest
import torch

from grpo_ext import GRPOExtConfig as GRPOConfig
from grpo_ext import GRPOExtTrainer as GRPOTrainer
from grpo_ext.logprobs import ScoringRequest, score_completions
from grpo_ext.testing import TINY_VLM_ARCHITECTURES, make_image_dataset, make_tiny_vlm

VISION_TOWERS = ("visual.", "vision_tower.", "vision_model.")  # where each family keeps its image encoder
LANGUAGE_MODELS = ("language_model.", "text_model.")
# Qwen2-VL and Qwen2.5-VL in depth: test_vlm.py
ARCHITECTURES = [name for name in TINY_VLM_ARCHITECTURES if not name.startswith("qwen")]


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def make_trainer(tmp_path, architecture, **overrides):
    model, processor = make_tiny_vlm(architecture)
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        learning_rate=1e-2, max_steps=1, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    args = GRPOConfig(**{**settings, **overrides})
    return GRPOTrainer(model, length_reward, args=args, train_dataset=make_image_dataset(8), processing_class=processor)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_step_moves_the_vision_tower_and_the_language_model(tmp_path, architecture):
    trainer = make_trainer(tmp_path, architecture)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(tower in name for name in changed for tower in VISION_TOWERS), "no gradient reached the images"
    assert any(lm in name for name in changed for lm in LANGUAGE_MODELS)


@pytest.mark.parametrize("architecture", TINY_VLM_ARCHITECTURES)
@torch.no_grad()
def test_scoring_matches_forward_and_generate(tmp_path, architecture):
    """The rollout's log-probs (the chunked scoring pass with each row's image tensors) equal those of the model's own
    forward with the processor's inputs, the images change them, and `generate` sampled its tokens with them."""
    trainer = make_trainer(tmp_path, architecture)
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(4)]  # two prompts, G = 4
    rollout = trainer.generate_and_score(rows)
    model = trainer.model.eval()
    scored = score_completions(
        model, rollout.prompt_ids, rollout.prompt_mask,
        ScoringRequest(rollout.completion_ids, rollout.completion_mask, model_inputs=rollout.model_inputs()),
    ).logps  # fmt: skip
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **rollout.model_inputs()).logits
    C = rollout.completion_ids.size(1)
    expected = torch.log_softmax(logits[:, -C - 1 : -1].float(), -1).gather(-1, rollout.completion_ids[..., None])
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(scored[mask], expected.squeeze(-1)[mask], atol=1e-4, rtol=1e-4)
    text_only = model(input_ids=input_ids, attention_mask=attention_mask).logits  # image tokens embedded as text
    assert not torch.allclose(logits[:, -C - 1 : -1], text_only[:, -C - 1 : -1], atol=1e-4)

    # Generation never samples the token the model fills with image features (it would have none)
    suppressed = trainer.rollout_engine.generation_config.suppress_tokens
    assert model.config.image_token_id in suppressed
    prompts = rollout.select(slice(0, 8, 4))  # one row of each group: two images
    out = model.generate(
        input_ids=prompts.prompt_ids, attention_mask=prompts.prompt_mask, **prompts.model_inputs(0),
        do_sample=False, max_new_tokens=4, min_new_tokens=4, output_logits=True, return_dict_in_generate=True,
        suppress_tokens=suppressed, eos_token_id=None,
    )  # fmt: skip
    completion_ids = out.sequences[:, prompts.prompt_ids.size(1) :]  # (2, 4)
    generated = torch.stack([torch.log_softmax(s.float(), -1) for s in out.logits], 1)  # (2, 4, V), unprocessed
    generated = generated.gather(-1, completion_ids[..., None]).squeeze(-1)
    request = ScoringRequest(completion_ids, torch.ones_like(completion_ids))
    request.model_inputs = prompts.vision.model_inputs(prompts.prompt_ids.size(1), 4, completion_ids.device)
    scored = score_completions(model, prompts.prompt_ids, prompts.prompt_mask, request).logps
    torch.testing.assert_close(scored, generated, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_rows_with_different_numbers_of_images(tmp_path):
    """Idefics3 gives each prompt's images as `(1, images, 3, H, W)`: rows with one and two images are zero-padded to
    two in one batch, as its processor pads them, and score as each group alone."""
    from PIL import Image

    images = [[Image.new("RGB", (28, 28), (255, 0, 0))], [Image.new("RGB", (28, 28), c) for c in [(0, 255, 0), (0, 0, 255)]]]  # fmt: skip
    prompt = [{"role": "user", "content": "What colours are the images?"}]
    trainer = make_trainer(tmp_path, "idefics3")
    rows = [{"prompt": prompt, "images": row_images} for row_images in images for _ in range(4)]
    rollout = trainer.generate_and_score(rows)
    assert rollout.model_inputs()["pixel_values"].shape[:2] == (8, 2)
    model = trainer.model.eval()
    scored = score_completions(
        model, rollout.prompt_ids, rollout.prompt_mask,
        ScoringRequest(rollout.completion_ids, rollout.completion_mask, model_inputs=rollout.model_inputs()),
    ).logps  # fmt: skip
    for group in (slice(0, 4), slice(4, 8)):
        alone = rollout.select(group)
        expected = score_completions(
            model, alone.prompt_ids, alone.prompt_mask,
            ScoringRequest(alone.completion_ids, alone.completion_mask, model_inputs=alone.model_inputs()),
        ).logps  # fmt: skip
        mask = alone.completion_mask.bool()
        torch.testing.assert_close(scored[group][mask], expected[mask], atol=1e-5, rtol=1e-5)
