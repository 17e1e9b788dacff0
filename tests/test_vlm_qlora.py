"""QLoRA on a vision-language model: a 4-bit load quantizes the language model only (the vision tower and projector
stay in the loading dtype), LoRA adapts the language model only unless `lora_vision_tower`, a step with images moves
the adapter alone, and the scoring pass of the 4-bit model gives the log-probs of its own forward."""

from contextlib import nullcontext

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from conftest import vlm_args
from peft import LoraConfig
from torch import nn

from grpo_ext import GRPOExtTrainer as GRPOTrainer
from grpo_ext.logprobs import ScoringRequest, score_completions
from grpo_ext.models import four_bit_config, language_model_adapter, vision_module_names
from grpo_ext.testing import (
    TINY_VLM_ARCHITECTURES,
    make_image_dataset,
    make_tiny_vlm,
)

# Every linear layer of both sides: Qwen2.5-VL's vision MLPs share the language model's names (gate_proj, ...)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1"]


# Where each architecture keeps its vision tower and projector (Qwen's `visual` holds its merger), and its language model
VISION_PARTS = (".visual.", ".vision_tower.", ".multi_modal_projector.", ".vision_model.", ".connector.")
LANGUAGE_PARTS = (".language_model.", ".text_model.")


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def qlora_trainer(tmp_path, architecture="qwen2_5_vl", target_modules="all-linear", **overrides):
    """A tiny VLM saved and loaded by path in 4-bit NF4 (float32 compute on the CPU), with a LoRA adapter."""
    model, processor = make_tiny_vlm(architecture, image_size=56)
    model.save_pretrained(tmp_path / "model")
    return GRPOTrainer(
        model=str(tmp_path / "model"),
        reward_funcs=length_reward,
        args=vlm_args(tmp_path, model_init_kwargs={"dtype": "float32"}, beta=0.1, **overrides),
        train_dataset=make_image_dataset(8, image_size=56),
        processing_class=processor,
        peft_config=LoraConfig(r=4, target_modules=target_modules),
        quantization_config=four_bit_config(torch.float32),
    )


def linear_layers(model):
    """`{name: layer}` of the model's own linear layers, plain or 4-bit (the adapter's lora_A / lora_B left out)."""
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, Linear4bit) and ".lora_" not in n}


@pytest.mark.parametrize("architecture", TINY_VLM_ARCHITECTURES)
def test_four_bit_quantizes_and_adapts_the_language_model_only(tmp_path, architecture):
    trainer = qlora_trainer(tmp_path, architecture)
    layers = linear_layers(trainer.model)
    vision = {name: m for name, m in layers.items() if any(part in name for part in VISION_PARTS)}
    language = {name: m for name, m in layers.items() if any(part in name for part in LANGUAGE_PARTS)}
    assert vision and language
    assert all(type(m) is Linear4bit and m.weight.quant_type == "nf4" for m in language.values())
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in vision.values())
    assert type(layers["base_model.model.lm_head"]) is nn.Linear  # transformers' default skip, kept
    adapted = {name.split(".lora_A")[0] for name, _ in trainer.model.named_parameters() if ".lora_A." in name}
    assert adapted and all(any(part in name for part in LANGUAGE_PARTS) for name in adapted)
    assert len(adapted) == len(language)  # "all-linear": every linear layer of the language model
    assert trainer.reference.mode == "disabled_adapter"


def test_lora_vision_tower_adapts_the_vision_side_too(tmp_path):
    trainer = qlora_trainer(tmp_path, target_modules=ALL_PROJECTIONS, lora_vision_tower=True)
    adapted = {name for name, _ in trainer.model.named_parameters() if ".lora_A." in name}
    assert any(".visual.blocks." in name for name in adapted)
    assert any(".language_model." in name for name in adapted)


def test_user_exclusions_are_kept():
    model, _ = make_tiny_vlm("qwen2_5_vl")
    assert vision_module_names(model) == ["model.visual"]
    config = language_model_adapter(LoraConfig(target_modules=ALL_PROJECTIONS, exclude_modules=["q_proj"]), model)
    from peft import get_peft_model

    adapted = {n for n, _ in get_peft_model(model, config).named_parameters() if ".lora_A." in n}
    assert adapted and not any(".visual." in n or ".q_proj." in n for n in adapted)


def test_step_with_images_moves_the_adapter_only(tmp_path):
    """Two micro-batches per rollout (old log-probs), beta > 0 (reference = disabled adapter): the LoRA weights move,
    and nothing else, 4-bit weights included."""
    trainer = qlora_trainer(tmp_path, steps_per_generation=2, gradient_accumulation_steps=1, max_steps=2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)
    assert trainer.state.log_history[0]["kl"] >= 0


@torch.no_grad()
def test_scoring_matches_the_four_bit_models_own_forward(tmp_path):
    """The chunked scoring pass of the 4-bit model with LoRA gives the log-probs of its own forward on the rollout's
    image tensors, and with the adapter disabled (the reference) those of the 4-bit base."""
    trainer = qlora_trainer(tmp_path)
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(4)]  # two prompts, G = 4
    rollout = trainer.generate_and_score(rows)
    model = trainer.model.eval()
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    C, mask = rollout.completion_ids.size(1), rollout.completion_mask.bool()
    request = ScoringRequest(rollout.completion_ids, rollout.completion_mask, model_inputs=rollout.model_inputs())
    for adapter in (True, False):
        with nullcontext() if adapter else trainer.model.disable_adapter():
            scored = score_completions(model, rollout.prompt_ids, rollout.prompt_mask, request).logps
            logits = model(input_ids=input_ids, attention_mask=attention_mask, **rollout.model_inputs()).logits
        expected = torch.log_softmax(logits[:, -C - 1 : -1].float(), -1).gather(-1, rollout.completion_ids[..., None])
        torch.testing.assert_close(scored[mask], expected.squeeze(-1)[mask], atol=1e-4, rtol=1e-4)
