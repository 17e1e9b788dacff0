"""What tests and callbacks written for trl.GRPOTrainer check, checked against TRL itself where it can run offline:
the same misuse raises TRL's exception type with TRL's message first (grpo-ext's advice after it), TRL's start-up
warnings are records of a `logging` logger with TRL's wording, and `ref_model` / `_logs` hold what TRL's hold."""

import logging
import re

import pytest
import torch
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, make_tokenizer

G = 4
TINY = dict(
    per_device_train_batch_size=8,  # 2 prompts x 4 generations = one generation batch of 8 rows
    num_generations=G,
    max_completion_length=6,
    max_steps=1,
    bf16=False,
    gradient_checkpointing=False,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    seed=0,
)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def build(trainer_class, config_class, output_dir, config=None, tokenizer=None, **kwargs):
    """A trainer of either library on a fresh tiny model (TRL changes the model's config as it builds)."""
    tokenizer = tokenizer or make_tokenizer()
    args = config_class(output_dir=str(output_dir), **{**TINY, **(config or {})})
    kwargs.setdefault("reward_funcs", digit_fraction_reward)
    kwargs.setdefault("train_dataset", make_prompt_dataset(8))
    return trainer_class(make_tiny_model("qwen2", tokenizer), args=args, processing_class=tokenizer, **kwargs)


def raised(make) -> Exception:
    with pytest.raises(Exception) as info:
        make()
    return info.value


class Env:
    def reset(self, **row):
        return "Count."

    def increment(self, step: int) -> int:
        """Add to the counter.

        Args:
            step: how much to add
        """
        return step


# --- Errors: TRL's exception and message first ---


@pytest.mark.parametrize(
    "config, kwargs",
    [
        pytest.param({}, dict(reward_funcs=None), id="no reward source"),
        pytest.param({}, dict(reward_funcs=None, train_dataset=None), id="no reward source, checked before the data"),
        pytest.param({}, dict(train_dataset=None), id="no train_dataset, no environment"),
        pytest.param(
            {}, dict(reward_funcs=[digit_fraction_reward] * 2, reward_processing_classes=[None]),
            id="reward_processing_classes of the wrong length",
        ),
        pytest.param({"reward_weights": [1.0, 2.0]}, {}, id="reward_weights of the wrong length"),
        pytest.param(
            {"max_steps": -1}, dict(train_dataset=make_prompt_dataset(8).to_iterable_dataset()),
            id="streamed train set without max_steps",
        ),
        pytest.param(
            {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": True}}, {},
            id="liger with its fused cross-entropy",  # TRL: at trainer start; grpo-ext: the config already
        ),
    ],
)  # fmt: skip
def test_misuse_raises_trls_exception_with_trls_message_first(tmp_path, config, kwargs):
    theirs = raised(lambda: build(GRPOTrainer, GRPOConfig, tmp_path / "trl", config, **kwargs))
    ours = raised(lambda: build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "ext", config, **kwargs))
    assert type(ours) is type(theirs) is ValueError
    assert str(ours).startswith(str(theirs)) and len(str(ours)) > len(str(theirs)), (str(theirs), str(ours))
    with pytest.raises(ValueError, match="^" + re.escape(str(theirs))):  # as a test written for TRL matches it
        build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "ext", config, **kwargs)


def test_liger_alone_is_refused_with_grpo_exts_reason():
    with pytest.raises(ValueError, match=r"^use_liger_kernel=True is not supported by GRPOExtConfig.*logprob_chunk"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, use_liger_kernel=True)


@pytest.mark.parametrize(
    "config, environment_factory, message",
    [
        (
            {"max_steps": -1},
            Env,
            "When training without a `train_dataset` (the environment owns the data and returns the prompt from "
            "`reset()`), `max_steps` must be set to a positive value to define the training length.",
        ),
        (
            {},
            {"a": Env, "b": Env},
            "A `dict` `environment_factory` (multiple environments) requires a `train_dataset` with an `environment` "
            "column to route each example to its environment. Provide a dataset, or pass a single environment "
            "factory.",
        ),
    ],
)
def test_no_train_dataset_with_an_environment_gives_trls_message(tmp_path, config, environment_factory, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):  # TRL's words (trl.GRPOTrainer.__init__)
        build(
            GRPOExtTrainer, GRPOExtConfig, tmp_path, config, tokenizer=make_tokenizer(tool_calling=True),
            train_dataset=None, environment_factory=environment_factory,
        )  # fmt: skip


# --- Warnings: records of a logger, TRL's wording first ---


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type="dapo", importance_sampling_level="sequence"),  # a sequence ratio in a token-summed loss
        dict(loss_type="luspo"),
        dict(loss_type="vespo", importance_sampling_level="sequence"),
        dict(model_init_kwargs={"dtype": "float32"}),  # with a model already built
    ],
)
def test_trls_logged_warnings_are_logged_with_trls_wording(caplog, tmp_path, config):
    with caplog.at_level(logging.WARNING, logger="trl.trainer.grpo_trainer"):
        build(GRPOTrainer, GRPOConfig, tmp_path / "trl", config)
    # accelerate's logger, which TRL uses, prefixes the process ("[RANK 0] ")
    theirs = [
        re.sub(r"^\[RANK \d+\] ", "", record.getMessage())
        for record in caplog.records
        if record.name == "trl.trainer.grpo_trainer"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl.trainer.grpo_trainer"):  # what a test written for TRL does
        build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "ext", config)
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("grpo_ext")]
    assert len(theirs) == 1, theirs
    assert any(message.startswith(theirs[0]) for message in ours), (theirs, ours)


def test_quantization_config_ignored_for_a_built_model_is_logged(caplog, tmp_path):
    from transformers import BitsAndBytesConfig

    with caplog.at_level(logging.WARNING):
        build(GRPOExtTrainer, GRPOExtConfig, tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert "You passed `quantization_config` to the trainer, but your model is already instantiated." in caplog.text


def test_use_transformers_paged_gives_trls_future_warning():
    def deprecation(config_class) -> str:
        with pytest.warns(FutureWarning) as caught:
            config_class(output_dir="x", use_cpu=True, bf16=False, use_transformers_paged=True)
        return next(str(w.message) for w in caught if "use_transformers_paged" in str(w.message))

    assert deprecation(GRPOExtConfig) == deprecation(GRPOConfig)


# --- Attributes TRL's tests and callbacks read ---


def test_ref_model_is_the_reference_copy_or_none_as_in_trl(tmp_path):
    full = build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "full", {"beta": 0.04})
    assert full.reference.mode == "copy" and full.ref_model is full.reference.model
    assert isinstance(full.ref_model, torch.nn.Module) and full.ref_model is not full.model
    assert not any(p.requires_grad for p in full.ref_model.parameters())
    assert build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "no_kl", {"beta": 0.0}).ref_model is None  # as TRL
    for settings in ({"beta": 0.04}, {"beta": 0.04, "sync_ref_model": True}):  # adapters disabled, snapshot adapter
        peft = build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "peft", settings, peft_config=LoraConfig(**LORA))
        assert peft.reference.mode in ("disabled_adapter", "snapshot_adapter") and peft.ref_model is None


def test_ref_model_synced_as_trls_test_reads_it(tmp_path):
    config = {"beta": 0.1, "learning_rate": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 1}
    trainer = build(GRPOExtTrainer, GRPOExtConfig, tmp_path, config)
    assert trainer.ref_model is not None
    before = {name: p.clone() for name, p in trainer.ref_model.named_parameters()}
    trainer.train()
    changed = [name for name, p in before.items() if not torch.equal(p, trainer.ref_model.get_parameter(name))]
    assert changed


def test_logs_buffers_hold_the_last_rollout_as_trls(tmp_path):
    def tagged(completions, log_extra, **kwargs):
        log_extra("test_column", [completion[:2] for completion in completions])
        return [float(len(completion)) for completion in completions]

    trl_trainer = build(GRPOTrainer, GRPOConfig, tmp_path / "trl")
    trainer = build(GRPOExtTrainer, GRPOExtConfig, tmp_path / "ext", reward_funcs=[digit_fraction_reward, tagged])
    assert trainer._logs.keys() == trl_trainer._logs.keys()  # images, prompt, completion, rewards, advantages, extra
    assert trainer._logs["prompt"].maxlen == trl_trainer._logs["prompt"].maxlen == 8  # a generation batch

    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(G)]
    rollout = trainer.generate_and_score(rows)  # log_completions is off: TRL keeps the buffers anyway
    logs = trainer._logs
    completions = list(logs["completion"])
    assert list(logs["prompt"]) == [row["prompt"] for row in rows] and len(completions) == 8
    assert list(logs["rewards"]["digit_fraction_reward"]) == pytest.approx(digit_fraction_reward(completions))
    assert list(logs["rewards"]["tagged"]) == [float(len(completion)) for completion in completions]
    assert list(logs["advantages"]) == pytest.approx(rollout.advantages.tolist())
    assert list(logs["extra"]["test_column"]) == [completion[:2] for completion in completions]
    assert len(logs["images"]) == 0

    trainer.generate_and_score(rows)  # a second rollout replaces the first: the buffers keep one generation batch
    assert len(logs["prompt"]) == len(logs["advantages"]) == len(logs["extra"]["test_column"]) == 8
    trainer.train()
    assert "test_column" in trainer._logs["extra"]  # what TRL's test of log_extra reads after train()
