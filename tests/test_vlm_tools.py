"""Tools with image prompts: the tool schema rendered into a prompt that holds images, the later turns generated from
the whole history with the prompt's images, and the completions (tool results masked) scored and trained with them.
A random tiny model never writes a tool call, so the first turn is scripted; the later turns are the model's own.
"""

import json

import pytest
import torch
from conftest import vlm_args

import grpo_ext.engine as engine_module
from grpo_ext import GRPOExtTrainer
from grpo_ext.rollout import micro_batches
from grpo_ext.testing import make_image_dataset, make_tiny_vlm

FIRST = "<tool_call>" + json.dumps({"name": "count", "arguments": {"colour": "red"}}) + "</tool_call><|im_end|>"
SUFFIX = "\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n"


def count(colour: str) -> int:
    """Count the things of a colour.

    Args:
        colour: the colour
    """
    return 3


class Counter:
    """An environment whose one tool is `count`: what TRL's environment_factory builds per rollout row."""

    def reset(self, **row):
        return None

    def count(self, colour: str) -> int:
        """Count the things of a colour.

        Args:
            colour: the colour
        """
        return 3


@pytest.mark.parametrize("source", ["tools", "environment_factory"])
def test_tool_turns_continue_the_history_with_its_images(tmp_path, monkeypatch, source):
    model, processor = make_tiny_vlm("qwen2_5_vl", tool_calling=True)
    tokenizer = processor.tokenizer
    real_generate = engine_module.generate_completions
    seen_images = []

    def first_turn_scripted(model, prompt_ids, prompt_mask, num_generations, generation_config, plan, *args, **kwargs):
        seen_images.append(kwargs.get("vision") or (args[2] if len(args) > 2 else None))
        if num_generations == 1:  # a later turn: the model itself, from prompt + completion + tool result
            return real_generate(model, prompt_ids, prompt_mask, 1, generation_config, plan, *args, **kwargs)
        ids = tokenizer(FIRST, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids] * prompt_ids.size(0))

    monkeypatch.setattr(engine_module, "generate_completions", first_turn_scripted)
    dataset = make_image_dataset(4, seed=1)
    args = vlm_args(tmp_path, max_completion_length=120, num_generations=2, generation_kwargs={"do_sample": False})
    trainer = GRPOExtTrainer(
        model, lambda completions, **kw: [float(len(c)) for c in completions], args=args, train_dataset=dataset,
        processing_class=processor, **({"tools": [count]} if source == "tools" else {"environment_factory": Counter}),
    )  # fmt: skip
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(2)]
    rollout = trainer.generate_and_score(rows, mode="train")

    assert all(vision is not None for vision in seen_images) and len(seen_images) == 2  # both turns saw the images
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rows[0]["prompt"][0]["content"]}]}],
        tools=[{"type": "function", "function": {"name": "count"}}], add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert "Tools: count" in prompt and tokenizer.decode(rollout.prompt_ids[0][rollout.prompt_mask[0].bool()]) == prompt
    before = len(tokenizer(FIRST + SUFFIX, add_special_tokens=False)["input_ids"])
    model.eval()
    for row in range(4):
        ids = rollout.completion_ids[row, : rollout.lengths[row]]
        assert tokenizer.decode(ids[:before]) == FIRST + SUFFIX
        assert tokenizer.decode(ids[:before][rollout.tool_mask[row, :before] == 0]) == SUFFIX  # the result, masked
        # The later turn is the model's greedy continuation of the whole history with the prompt's image, as the
        # processor encodes that history itself
        history = processor(text=[prompt + FIRST + SUFFIX],
                            images=[rows[row]["image"]], return_tensors="pt", add_special_tokens=False)  # fmt: skip
        expected = model.generate(**history, max_new_tokens=120 - before, do_sample=False)[
            0, history["input_ids"].size(1) :
        ]
        stops = [i for i, token in enumerate(expected.tolist()) if token in trainer.eos_token_ids]
        expected = expected[: stops[0] + 1] if stops else expected
        assert ids[before:].tolist() == expected.tolist(), row

    # The loss of those completions (tool results masked) is computed with the images: its gradient reaches the
    # vision tower
    (batch,) = micro_batches(rollout, 1, 1, trainer.args.max_completion_length, trainer.accelerator)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
    model.train()
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    vision_grads = [p.grad for name, p in model.named_parameters() if ".visual." in f".{name}"]
    assert vision_grads and any(g is not None and g.abs().sum() > 0 for g in vision_grads)


def test_a_tool_returning_an_image_is_refused_by_name(tmp_path, monkeypatch):
    """TRL feeds a tool's image parts back to the model; grpo-ext's tool results are text, so such a result is an
    error naming the tool rather than an image's repr in the conversation."""
    model, processor = make_tiny_vlm("qwen2_5_vl", tool_calling=True)
    dataset = make_image_dataset(4, seed=1)

    def count(colour: str) -> list:
        """Count the things of a colour.

        Args:
            colour: the colour
        """
        return [{"type": "image", "image": dataset[0]["image"]}, {"type": "text", "text": "3"}]

    ids = processor.tokenizer(FIRST, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(
        engine_module,
        "generate_completions",
        lambda model, prompt_ids, *args, **kwargs: torch.tensor([ids] * len(prompt_ids)),
    )
    args = vlm_args(tmp_path, max_completion_length=120, num_generations=2)
    trainer = GRPOExtTrainer(
        model, lambda completions, **kw: [0.0] * len(completions), args=args, train_dataset=dataset,
        processing_class=processor, tools=[count],
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="Tool 'count' returned image parts"):
        trainer.generate_and_score([trainer.train_dataset[0]] * 2, mode="train")
