"""Vision-language GRPO with TRL's surface (grpo_ext.vision): a TRL VLM script runs with the import changed, the image
tensors reach every pass with the right rows, and bad input fails at start with a message that says what to do."""

import pytest
import torch
from conftest import vlm_args

from grpo_ext import GRPOExtTrainer as GRPOTrainer
from grpo_ext.logprobs import ScoringRequest, score_completions
from grpo_ext.testing import make_image_dataset, make_tiny_model, make_tiny_vlm, make_tokenizer


def colour_reward(completions, image, **kwargs):
    """A TRL-style reward that reads the `image` column: 1 when the completion names the image's dominant channel."""
    names = ["red", "green", "blue"]
    return [float(names[max(range(3), key=lambda c: img.getpixel((0, 0))[c])] in c[0]["content"]) for c, img in zip(completions, image)]  # fmt: skip


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


@pytest.mark.parametrize("architecture", ["qwen2_5_vl", "qwen2_vl"])  # the others: test_vlm_architectures.py
def test_trl_vlm_script_trains(tmp_path, architecture):
    """TRL's VLM script shape: an `image` column, conversational prompts, a processor; the parameters move and the
    reward functions get the `image` column and the prompts with their image parts."""
    model, processor = make_tiny_vlm(architecture)
    seen = {}

    def spy_reward(prompts, completions, image, **kwargs):
        seen["prompt"], seen["image"] = prompts[0], image[0]
        return length_reward(completions)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[spy_reward, colour_reward],
        args=vlm_args(tmp_path, log_multimodal=True),
        train_dataset=make_image_dataset(8),
        processing_class=processor,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any("visual" in name for name in changed) and any("language_model" in name for name in changed)
    parts = seen["prompt"][0]["content"]
    assert parts[0]["type"] == "image" and parts[0]["image"] is not None and parts[1]["type"] == "text"
    assert seen["image"].size == (28, 28)
    assert len(trainer._logs["images"]) == 4 and trainer._logs["images"][0][0].size == (28, 28)


def test_peft_with_reference_and_old_logps(tmp_path):
    """LoRA on the language model, beta > 0 (reference = disabled adapter), two micro-batches per rollout and the
    policy moving between them (old log-probs), with 56 x 56 images (4 image tokens each)."""
    from peft import LoraConfig

    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=56)
    args = vlm_args(tmp_path, beta=0.1, steps_per_generation=2, gradient_accumulation_steps=1, max_steps=2)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=make_image_dataset(8, image_size=56),
        processing_class=processor,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.reference.mode == "disabled_adapter"
    lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_B" in name}
    trainer.train()
    assert any(not torch.equal(p, lora[name]) for name, p in trainer.model.named_parameters() if name in lora)
    assert all("visual" not in name for name in lora)
    assert trainer.state.log_history[0]["kl"] >= 0


def _rollout(tmp_path, image_size=56, **overrides):
    model, processor = make_tiny_vlm("qwen2_5_vl", image_size=image_size)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=vlm_args(tmp_path, **overrides),
        train_dataset=make_image_dataset(8, image_size=image_size),
        processing_class=processor,
    )
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(4)]  # two prompts, G = 4
    return trainer, trainer.generate_and_score(rows)


def test_training_logps_equal_rollout_logps_per_micro_batch(tmp_path):
    """Old log-probs are scored on the whole rollout; each training micro-batch (its own rows' images, split by
    `Rollout.split`) scores its rows to the same values."""
    trainer, rollout = _rollout(tmp_path, steps_per_generation=2, gradient_accumulation_steps=1)
    assert rollout.old_per_token_logps is not None
    from grpo_ext.rollout import score_rollout

    for part in rollout.split(2):
        assert len(part.vision) == len(part) == 4
        with torch.no_grad():
            logps = score_rollout(trainer.model, part, trainer.args.temperature, trainer.args.logprob_chunk_size).logps
        mask = part.completion_mask.bool()
        torch.testing.assert_close(logps[mask], part.old_per_token_logps[mask], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generation_and_scoring_agree(tmp_path):
    """`generate` with the rollout's image tensors predicts each completion token with the log-probs the scoring pass
    gives it: generation and scoring see the same pixels and the same positions (left padding included)."""
    trainer, rollout = _rollout(tmp_path, max_completion_length=5)
    model = trainer.model.eval()
    rows = slice(0, 8, 4)  # one row of each group: two images, prompts of equal length
    prompts = rollout.select(rows)
    out = model.generate(
        input_ids=prompts.prompt_ids, attention_mask=prompts.prompt_mask, **prompts.model_inputs(0),
        do_sample=False, max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True,
        suppress_tokens=None, eos_token_id=None,
    )  # fmt: skip
    completion_ids = out.sequences[:, prompts.prompt_ids.size(1) :]  # (2, 5)
    generated = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # (2, 5, V)
    generated = generated.gather(-1, completion_ids[..., None]).squeeze(-1)
    request = ScoringRequest(completion_ids, torch.ones_like(completion_ids), model_inputs=None)
    request.model_inputs = prompts.vision.model_inputs(prompts.prompt_ids.size(1), 5, completion_ids.device)
    scored = score_completions(model, prompts.prompt_ids, prompts.prompt_mask, request).logps
    torch.testing.assert_close(scored, generated, atol=1e-4, rtol=1e-4)


# --- Bad input ---


def test_image_column_with_a_tokenizer(tmp_path):
    model, processor = make_tiny_vlm("qwen2_5_vl")
    with pytest.raises(ValueError, match="has an 'image' column but the trainer got a .*not a processor"):
        GRPOTrainer(model, length_reward, args=vlm_args(tmp_path), train_dataset=make_image_dataset(8),
                    processing_class=processor.tokenizer)  # fmt: skip


def test_image_column_with_a_text_only_model(tmp_path):
    model, processor = make_tiny_vlm("qwen2_5_vl")
    text_model = make_tiny_model("qwen2", processor.tokenizer)
    with pytest.raises(ValueError, match="takes no images"):
        GRPOTrainer(text_model, length_reward, args=vlm_args(tmp_path), train_dataset=make_image_dataset(8),
                    processing_class=processor)  # fmt: skip


def test_missing_processor(tmp_path):
    model, _ = make_tiny_vlm("qwen2_5_vl")
    with pytest.raises(ValueError, match="vision-language model built in memory.*AutoProcessor"):
        GRPOTrainer(model, length_reward, args=vlm_args(tmp_path), train_dataset=make_image_dataset(8))


def test_a_rollout_func_with_an_image_column_is_refused_at_start(tmp_path):
    """A custom rollout beside an image column: refused by name when the trainer is built, not at the first rollout
    (tools and environments work with images: tests/test_vlm_tools.py)."""
    model, processor = make_tiny_vlm("qwen2_5_vl")
    with pytest.raises(
        NotImplementedError, match="train_dataset has an 'image' column and the trainer got a rollout_func"
    ):
        GRPOTrainer(model, length_reward, args=vlm_args(tmp_path), train_dataset=make_image_dataset(8),
                    processing_class=processor, rollout_func=lambda prompts, trainer: {})  # fmt: skip


@pytest.mark.parametrize(
    ("image", "message"),
    [("/nonexistent/cat.png", "could not be opened.*FileNotFoundError"), (42, "the image is int.*not a PIL image")],
)
def test_unreadable_image(tmp_path, image, message):
    from datasets import Dataset

    model, processor = make_tiny_vlm("qwen2_5_vl")
    rows = make_image_dataset(8).to_list()
    dataset = Dataset.from_list([{**row, "image": image} for row in rows])
    with pytest.raises((ValueError, TypeError), match=f"train_dataset row 0, column 'image'.*{message}"):
        GRPOTrainer(model, length_reward, args=vlm_args(tmp_path), train_dataset=dataset, processing_class=processor)


def test_more_images_than_placeholders(tmp_path):
    from datasets import Dataset

    model, processor = make_tiny_vlm("qwen2_5_vl")
    rows = make_image_dataset(8).to_list()
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colours?"}]}]
    dataset = Dataset.from_list([{"prompt": prompt, "images": [row["image"], row["image"]]} for row in rows])
    trainer = GRPOTrainer(model, length_reward, args=vlm_args(tmp_path), train_dataset=dataset,
                          processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match=r"Number of images provided \(2\) does not match number of image placeholders \(1\)"):  # fmt: skip
        trainer.train()


def test_long_image_prompt_is_not_cut(tmp_path):
    model, processor = make_tiny_vlm("qwen2_5_vl")
    trainer = GRPOTrainer(model, length_reward, args=vlm_args(tmp_path, max_prompt_length=8),
                          train_dataset=make_image_dataset(8), processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="more than max_prompt_length=8; prompts of a batch with images are not cut"):
        trainer.train()


@pytest.mark.parametrize(
    "loss_type",
    ["grpo", "luspo"]  # a token ratio and a sequence ratio in the fast tier, the others with the slow tests
    + [pytest.param(name, marks=pytest.mark.slow) for name in ("dapo", "dr_grpo", "bnpo", "cispo", "sapo", "vespo")],
)
def test_every_loss_type_trains_a_vlm_with_padding_and_a_sequence_ratio(tmp_path, loss_type):
    """Each loss type on image batches, with `pad_to_multiple_of` (prompts padded on the left, completions on the
    right: the image tokens stay with their pixels), beta > 0, two optimizer passes per rollout (a ratio that is not
    1) and, for the two that use it, the sequence-level importance ratio: finite losses and moving weights."""
    model, processor = make_tiny_vlm("qwen2_5_vl")
    sequence_level = loss_type in ("luspo", "vespo")
    args = vlm_args(
        tmp_path, loss_type=loss_type, beta=0.05, pad_to_multiple_of=8, num_iterations=2, max_steps=2,
        importance_sampling_level="sequence" if sequence_level else "token",
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=make_image_dataset(8),
        processing_class=processor,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_task_metrics_are_measured_on_the_images(tmp_path):
    """`eval_reward_funcs` on an image dataset: the greedy answers are generated from the prompts with their images
    as image parts, and the task metric gets the `image` column, row by row."""
    model, processor = make_tiny_vlm("qwen2_5_vl")
    seen = {}

    def sees_image(prompts, completions, image, **kwargs):
        seen["prompt"], seen["image"] = prompts[0], list(image)
        return [1.0 if c[0]["content"] else 0.0 for c in completions]

    eval_set = make_image_dataset(4, seed=5)
    args = vlm_args(tmp_path, eval_reward_funcs=["sees_image"], eval_task_metrics_only=True)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[sees_image],
        args=args,
        train_dataset=make_image_dataset(8),
        eval_dataset=eval_set,
        processing_class=processor,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_task_problems"] == 4 and 0.0 <= metrics["eval_pass@1/sees_image"] <= 1.0
    assert seen["prompt"][0]["content"][0]["type"] == "image"  # the prompt carries its image
    assert [img.tobytes() for img in seen["image"]] == [img.tobytes() for img in eval_set["image"]]


def test_a_model_path_loads_its_processor_when_the_model_takes_images(tmp_path):
    """`load_tokenizer` on a saved folder (the recipe's path): a vision-language model's config gives its processor,
    a text model's gives its tokenizer, and an adapter folder with the processor saved beside it its processor."""
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    from grpo_ext.models import load_tokenizer

    vlm, processor = make_tiny_vlm("llava")
    vlm.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    tokenizer = make_tokenizer()
    text_model = make_tiny_model(tokenizer=tokenizer)
    text_model.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")

    loaded = load_tokenizer(str(tmp_path / "vlm"))
    assert isinstance(loaded, ProcessorMixin) and loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    loaded = load_tokenizer(str(tmp_path / "text"))
    assert isinstance(loaded, PreTrainedTokenizerBase) and loaded.get_vocab() == tokenizer.get_vocab()
    processor.save_pretrained(tmp_path / "adapter")  # what the trainer saves beside an adapter: no config.json
    assert isinstance(load_tokenizer(str(tmp_path / "adapter")), ProcessorMixin)


def test_a_vision_language_model_alone_is_evaluated_on_its_images():
    """`evaluate_accuracy` (recipes/evaluate.py) with a processor: each greedy answer comes from the prompt with its
    row's image, and the task metric gets that prompt and the `image` column, row by row."""
    from grpo_ext.evaluation import evaluate_accuracy

    model, processor = make_tiny_vlm("qwen2_5_vl")
    dataset = make_image_dataset(4, seed=3)

    def sees_its_image(prompts, completions, image, **kwargs):
        parts = [prompt[-1]["content"][0] for prompt in prompts]
        return [
            float(part["type"] == "image" and part["image"].tobytes() == img.tobytes())
            for part, img in zip(parts, image, strict=True)
        ]

    results = evaluate_accuracy(model, processor, dataset, max_new_tokens=3, reward_funcs={"sees": sees_its_image})
    assert results["num_problems"] == 4 and results["pass@1/sees"] == 1.0
