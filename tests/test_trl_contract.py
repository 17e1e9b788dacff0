"""grpo-ext builds on TRL classes that TRL marks private, and accepts every field of trl.GRPOConfig. If this file
fails, TRL moved or added something: re-check the trainer and config.REFUSED_TRL_FIELDS against the new TRL before
widening the version range in pyproject.toml."""

import dataclasses
import inspect

import pytest
from transformers import Trainer, TrainingArguments
from trl.trainer.base_config import _BaseConfig
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler, repeat_iterable_dataset

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.config import DEFAULTS_DIFFERING_FROM_TRL, REFUSED_TRL_FIELDS
from grpo_ext.settings import check_settings


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
    # a stream's stand-in for RepeatSampler (data.grouped_stream)
    stream_args = list(inspect.signature(repeat_iterable_dataset).parameters)
    assert stream_args == ["dataset", "mini_repeat_count", "batch_size", "repeat_count"]


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


def test_loss_settings_trl_warns_about_are_warned_about(caplog):
    def config(**fields):
        return GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, **fields)

    # at trainer start, as trl.GRPOTrainer warns (check_settings is what GRPOExtTrainer runs first), through a logger
    # as TRL logs them (tests/test_trl_messages.py compares the wording with TRL's)
    for fields, message in [
        (dict(loss_type="dapo", importance_sampling_level="sequence"), "weights each sequence by its completion"),
        (dict(loss_type="luspo"), "When using `'luspo'` loss"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "VESPO computes sequence-level importance"),
    ]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="grpo_ext.objective"):
            check_settings(config(**fields))
        assert [record.levelname for record in caplog.records] == ["WARNING"] and message in caplog.text
    with pytest.raises(ValueError, match="delta"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, delta=1.1)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, top_entropy_quantile=1.5)


def test_trust_remote_code_reaches_every_loader():
    args = GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, trust_remote_code=True)
    assert args.model_init_kwargs == {"trust_remote_code": True}  # model, tokenizer, reward models, reference copy


def test_trainer_attributes_and_methods_trl_users_and_callbacks_read(tokenizer, make_args, tmp_path):
    """`reward_funcs`, `reward_func_names`, `reward_processing_classes`, `reward_weights`, `get_high_entropy_mask`
    and `get_off_policy_mask` with trl.GRPOTrainer's names, signatures and values."""
    import torch
    from conftest import tiny_trainer
    from transformers import PreTrainedModel
    from trl import GRPOTrainer

    from grpo_ext.testing import digit_fraction_reward, save_tiny_reward_model

    for name in ("get_high_entropy_mask", "get_off_policy_mask"):
        ours = inspect.signature(getattr(GRPOExtTrainer, name), eval_str=True)
        assert ours == inspect.signature(getattr(GRPOTrainer, name))
    assert isinstance(inspect.getattr_static(GRPOExtTrainer, "get_off_policy_mask"), staticmethod)

    reward_model = save_tiny_reward_model(tmp_path / "reward_model")
    trainer = tiny_trainer(tokenizer, make_args(reward_weights=[1.0, 0.5]), [digit_fraction_reward, reward_model])
    assert trainer.reward_func_names == ["digit_fraction_reward", "reward_model"]
    assert trainer.reward_funcs[0] is digit_fraction_reward and isinstance(trainer.reward_funcs[1], PreTrainedModel)
    assert trainer.reward_funcs[1] is trainer.rewards.reward_models[0]  # the module that scores, not a copy
    reward_tokenizer = trainer.reward_processing_classes[1]
    assert trainer.reward_processing_classes[0] is None
    assert reward_tokenizer.pad_token_id == trainer.reward_funcs[1].config.pad_token_id is not None
    assert trainer.reward_weights.dtype == torch.float32 and trainer.reward_weights.tolist() == [1.0, 0.5]
    trainer.reward_weights = torch.tensor([2.0, 0.0])  # a callback re-weighting the rewards mid-run
    assert trainer.rewards.weighted_sum(torch.tensor([[1.0, 3.0]])).tolist() == [2.0]
    with pytest.raises(ValueError, match=r"Number of reward weights \(1\) must match number of reward functions \(2\)"):
        trainer.reward_weights = [1.0]

    torch.manual_seed(0)
    entropies, mask = torch.rand(4, 6), (torch.rand(4, 6) > 0.3).float()
    ours = trainer.get_high_entropy_mask(entropies, mask, 0.8)
    assert ours.dtype == torch.bool and 0 < ours.sum() < mask.sum()
    assert torch.equal(ours, GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, 0.8))
    advantages = torch.tensor([[1.0], [-1.0], [-1.0], [0.0]])
    logps, sampling_logps = -torch.rand(4, 6), -torch.rand(4, 6)
    kept = trainer.get_off_policy_mask(advantages, logps, sampling_logps, mask, off_policy_threshold=0.05)
    assert kept.shape == (4, 1) and kept[0] == 1 and kept[3] == 1  # A >= 0 is always kept
    assert torch.equal(kept, GRPOTrainer.get_off_policy_mask(advantages, logps, sampling_logps, mask, 0.05))
    kl = ((sampling_logps - logps) * mask).sum(1) / mask.sum(1)
    assert kept[1:3, 0].tolist() == [float(kl[1] <= 0.05), float(kl[2] <= 0.05)]


def test_the_loss_takes_its_masks_from_the_overridable_methods(tokenizer, make_args):
    """As in TRL, compute_loss calls `self.get_high_entropy_mask` and `self.get_off_policy_mask`: a subclass that
    drops every sequence leaves only the KL term, which is 0 on the first step (policy == reference)."""
    import torch

    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model

    calls = []

    class DropAll(GRPOExtTrainer):
        def get_high_entropy_mask(self, entropies, mask, threshold):
            calls.append(("entropy", threshold, tuple(entropies.shape)))
            return super().get_high_entropy_mask(entropies, mask, threshold)

        @staticmethod
        def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
            calls.append(("off_policy", off_policy_threshold, tuple(advantages.shape)))
            return torch.zeros(advantages.size(0), 1)

    trainer = DropAll(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=make_args(max_steps=1, top_entropy_quantile=0.25, off_policy_mask_threshold=0.1),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    assert calls[0][:2] == ("entropy", 0.75) and calls[1] == ("off_policy", 0.1, (8, 1))
    assert trainer.state.log_history[0]["loss"] == 0.0
