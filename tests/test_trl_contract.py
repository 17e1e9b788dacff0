"""grpo-ext builds on TRL classes that TRL marks private, and accepts every field of trl.GRPOConfig. If this file
fails, TRL moved or added something: re-check the trainer and config.REFUSED_TRL_FIELDS against the new TRL before
widening the version range in pyproject.toml."""

import dataclasses
import inspect

import pytest
from transformers import Trainer, TrainingArguments
from trl.trainer.base_config import _BaseConfig
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.config import DEFAULTS_DIFFERING_FROM_TRL, REFUSED_TRL_FIELDS


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


def _trl_fields() -> dict:
    from trl import GRPOConfig

    return {f.name: f for f in dataclasses.fields(GRPOConfig)}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_every_trl_field_is_implemented_or_refused_by_name():
    """Each trl.GRPOConfig field is a GRPOExtConfig field of the same name: implemented with TRL's meaning, or listed
    in REFUSED_TRL_FIELDS (only TRL's default accepted). A field TRL adds fails here until it is one or the other."""
    trl_fields, ours = _trl_fields(), {f.name: f for f in dataclasses.fields(GRPOExtConfig)}
    assert sorted(set(trl_fields) - set(ours)) == []
    assert sorted(set(REFUSED_TRL_FIELDS) - set(trl_fields)) == []  # no stale entry
    assert set(DEFAULTS_DIFFERING_FROM_TRL) <= set(trl_fields) - set(REFUSED_TRL_FIELDS)
    for name, reason in REFUSED_TRL_FIELDS.items():
        assert len(reason) > 40 and reason in GRPOExtConfig.__doc__, name
    # Implemented fields keep TRL's default, except the documented ones
    differing = {
        name for name, f in trl_fields.items() if name not in REFUSED_TRL_FIELDS and _default(f) != _default(ours[name])
    }
    assert differing == set(DEFAULTS_DIFFERING_FROM_TRL)


def _other_value(name: str, default):
    """A value of the field's type that is not TRL's default."""
    special = {"vllm_mode": "server", "vllm_model_impl": "transformers"}
    special |= {"multi_objective_aggregation": "normalize_then_sum", "vllm_importance_sampling_mode": "token_mask"}
    special |= {"transformers_continuous_batching_config": {"max_batch_tokens": 64}, "cache_implementation": "static"}
    special |= {"vllm_structured_outputs_regex": "[0-9]+", "vllm_server_base_url": "http://localhost:8000"}
    if name in special:
        return special[name]
    if isinstance(default, bool):
        return not default
    if default is None:
        return 2
    if isinstance(default, str):
        return default + "-changed"
    return default + 1 if isinstance(default, int) else default / 2


@pytest.mark.parametrize("name", sorted(REFUSED_TRL_FIELDS))
def test_refused_field_accepts_trl_default_and_names_itself_otherwise(name):
    default = _default(_trl_fields()[name])
    GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, **{name: default})
    with pytest.raises(ValueError, match=rf"^{name}=.* is not supported by GRPOExtConfig"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, **{name: _other_value(name, default)})


def test_a_config_with_every_trl_field_at_trl_defaults_loads():
    from trl.trainer.base_config import _BaseConfig

    inherited = {f.name for f in dataclasses.fields(_BaseConfig)}
    values = {name: _default(f) for name, f in _trl_fields().items() if name not in inherited}
    args = GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, **values)
    assert (args.beta, args.loss_type, args.use_bias_correction_kl) == (0.0, "dapo", True)
    assert args.pad_to_multiple_of is None and not args.use_vllm  # TRL's "auto": no padding off Neuron


def test_pad_to_multiple_of_is_read_as_trl_reads_it():
    def value(given):
        return GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, pad_to_multiple_of=given).pad_to_multiple_of

    assert [value(v) for v in ("auto", None, "none", "null", "64", 16)] == [None, None, None, None, 64, 16]
    with pytest.raises(ValueError, match="pad_to_multiple_of='x' must be an int >= 1"):
        value("x")
    with pytest.raises(ValueError, match="pad_to_multiple_of=0 must be an int >= 1"):
        value(0)


def test_log_completions_hub_repo_and_router_aux_loss_coef_are_checked():
    with pytest.raises(ValueError, match="log_completions_hub_repo is set, but log_completions is False"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, log_completions_hub_repo="someone/completions")
    with pytest.raises(ValueError, match="router_aux_loss_coef=-0.1 must be >= 0"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, router_aux_loss_coef=-0.1)


def test_loss_settings_trl_warns_about_are_warned_about():
    with pytest.warns(UserWarning, match="weights each sequence by its completion length"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="dapo", importance_sampling_level="sequence")
    with pytest.warns(UserWarning, match="luspo"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="luspo")
    with pytest.warns(UserWarning, match="vespo"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="delta"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, delta=1.1)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, top_entropy_quantile=1.5)


def test_trust_remote_code_reaches_every_loader():
    args = GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, trust_remote_code=True)
    assert args.model_init_kwargs == {"trust_remote_code": True}  # model, tokenizer, reward models, reference copy
