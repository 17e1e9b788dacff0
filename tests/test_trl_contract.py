"""grpo-ext builds on TRL classes that TRL marks private. If this file fails, TRL moved them: re-check the
trainer against the new TRL before widening the version range in pyproject.toml."""

import inspect

from transformers import Trainer, TrainingArguments
from trl.trainer.base_config import _BaseConfig
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from grpo_ext import GRPOExtConfig, GRPOExtTrainer


def test_private_base_classes_are_where_we_build_on_them():
    assert issubclass(_BaseTrainer, Trainer) and issubclass(GRPOExtTrainer, _BaseTrainer)
    assert issubclass(_BaseConfig, TrainingArguments) and issubclass(GRPOExtConfig, _BaseConfig)
    # The hooks this trainer relies on, with the signatures it calls them with
    assert "loss_is_scaled_for_ga" in vars(_BaseTrainer) or hasattr(Trainer, "loss_is_scaled_for_ga")
    assert list(inspect.signature(Trainer._get_dataloader).parameters)[:6] == [
        "self",
        "dataset",
        "description",
        "batch_size",
        "sampler_fn",
        "is_training",
    ]
    sampler_args = set(inspect.signature(RepeatSampler).parameters)
    assert {"data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"} <= sampler_args


def test_shared_config_fields_keep_trl_names():
    from trl import GRPOConfig

    shared = {
        "num_generations",
        "max_completion_length",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "generation_batch_size",
        "steps_per_generation",
        "num_iterations",
        "beta",
        "epsilon",
        "epsilon_high",
        "loss_type",
        "importance_sampling_level",
        "scale_rewards",
        "reward_weights",
        "mask_truncated_completions",
        "log_completions",
        "model_init_kwargs",
        "generation_kwargs",
        "chat_template_kwargs",
        "shuffle_dataset",
    }
    trl_fields, our_fields = set(GRPOConfig.__dataclass_fields__), set(GRPOExtConfig.__dataclass_fields__)
    assert shared <= trl_fields and shared <= our_fields
