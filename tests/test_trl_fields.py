"""TRL fields with TRL's meaning: num_generations_eval, multi_objective_aggregation, sync_ref_model (TR-DPO),
cast_lm_head_to_fp32, and the dtype rules of model_init_kwargs."""

import math
import statistics

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import create_model_from_path

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.logprobs import completion_logps_and_entropies
from grpo_ext.models import cast_lm_head_to_fp32, load_causal_lm
from grpo_ext.reference import SNAPSHOT_ADAPTER
from grpo_ext.settings import check_settings
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, save_tiny_model

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _trainer(tokenizer, args, peft_config=None, **kwargs):
    return GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        kwargs.pop("reward_funcs", digit_fraction_reward),
        args=args,
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
        peft_config=peft_config,
        **kwargs,
    )


# --- num_generations_eval ---


def test_eval_rollout_uses_num_generations_eval(tokenizer, make_args):
    args = make_args(num_generations=4, num_generations_eval=2, per_device_eval_batch_size=4, beta=0.0)
    row_rewards = lambda completions, **kwargs: [float(i) for i in range(len(completions))]  # noqa: E731
    trainer = _trainer(tokenizer, args, reward_funcs=row_rewards, eval_dataset=make_prompt_dataset(4))
    rollouts, prompts_seen = [], []
    generate_and_score = trainer.generate_and_score

    def spy(rows, mode):
        prompts_seen.append([row["prompt"] for row in rows])
        rollouts.append(generate_and_score(rows, mode))
        return rollouts[-1]

    trainer.generate_and_score = spy
    trainer.evaluate()
    metrics = trainer.state.log_history[-1]  # the logged eval metrics
    # 4 prompts x 2 completions, in batches of 4 rows = 2 groups of 2, each prompt twice in a row
    assert [len(batch) for batch in prompts_seen] == [4, 4]
    seen = [prompt for batch in prompts_seen for prompt in batch]
    assert seen[0::2] == seen[1::2] and len(set(seen)) == 4
    # rewards [0, 1, 2, 3] in groups of 2: each group's std is 1/sqrt(2), advantages -+0.5 / (0.5 * sqrt(2) + 1e-4)
    expected = 0.5 / (0.5 * math.sqrt(2) + 1e-4)
    for rollout in rollouts:
        torch.testing.assert_close(rollout.advantages, torch.tensor([-expected, expected, -expected, expected]))
    assert metrics["eval_frac_reward_zero_std"] == 0.0
    assert metrics["eval_reward"] == pytest.approx(1.5)


def test_eval_batch_check_uses_num_generations_eval(tokenizer, make_args):
    # 6 rows hold whole groups of 2 (not of num_generations=4): accepted
    _trainer(
        tokenizer, make_args(num_generations_eval=2, per_device_eval_batch_size=6), eval_dataset=make_prompt_dataset(4)
    )
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size=4 .* not divisible by num_generations_eval=3"):
        _trainer(
            tokenizer,
            make_args(num_generations_eval=3, per_device_eval_batch_size=4),
            eval_dataset=make_prompt_dataset(4),
        )
    args = make_args(num_generations_eval=3, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match=r"not divisible by num_generations_eval=3"):  # at start, before the data
        check_settings(args)
    with pytest.raises(ValueError, match="num_generations_eval=0 must be >= 1"):
        make_args(num_generations_eval=0)


# --- multi_objective_aggregation ---

# 6 completions in 2 groups of 3, 2 reward functions (weights 1 and 0.5); the second returned None for row 0.
REWARDS_PER_FUNC = [[1.0, math.nan], [2.0, 1.0], [4.0, 3.0], [0.0, 2.0], [0.0, 2.0], [3.0, 2.0]]
WEIGHTS = [1.0, 0.5]
G = 3


def _normalized(values):
    """(v - mean) / (sample std + 1e-4) over the values that are not NaN; NaN stays NaN."""
    present = [v for v in values if not math.isnan(v)]
    mean, std = statistics.mean(present), statistics.stdev(present)
    return [(v - mean) / (std + 1e-4) for v in values]


def _hand_advantages(aggregation, scale_rewards):
    groups = [REWARDS_PER_FUNC[i : i + G] for i in range(0, len(REWARDS_PER_FUNC), G)]
    weighted = lambda row: sum(w * r for w, r in zip(WEIGHTS, row) if not math.isnan(r))  # noqa: E731
    if aggregation == "normalize_then_sum":
        rewards = []
        for group in groups:
            columns = [_normalized([row[k] for row in group]) for k in range(len(WEIGHTS))]
            rewards += [weighted(row) for row in zip(*columns)]
        return _normalized(rewards)  # over the batch
    advantages = []
    for group in groups:
        rewards = [weighted(row) for row in group]
        mean = statistics.mean(rewards)
        if scale_rewards == "batch":
            std = statistics.stdev([weighted(row) for row in REWARDS_PER_FUNC])
        else:
            std = statistics.stdev(rewards)
        advantages += [(r - mean) / (std + 1e-4) for r in rewards]
    return advantages


def _trl_advantages(tmp_path, tokenizer, rows, rewards_per_func, **settings):
    """TRL's own `_generate_and_score_completions` on the same rows, with its rewards replaced by ours."""
    trl_args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), num_generations=G, per_device_train_batch_size=6, max_completion_length=3,
        reward_weights=WEIGHTS, bf16=False, use_cpu=True, report_to=[], **settings,
    )  # fmt: skip
    trainer = GRPOTrainer(
        save_tiny_model(tmp_path / "model"), [digit_fraction_reward, digit_fraction_reward], args=trl_args,
        train_dataset=make_prompt_dataset(8), processing_class=tokenizer,
    )  # fmt: skip
    trainer._calculate_rewards = lambda *args, **kwargs: rewards_per_func.clone()
    trainer.model.train()
    return trainer._generate_and_score_completions(rows)["advantages"]


@pytest.mark.parametrize(
    "aggregation, scale_rewards",
    [
        ("sum_then_normalize", "group"),
        ("sum_then_normalize", "batch"),
        ("normalize_then_sum", "group"),
        ("normalize_then_sum", "none"),  # scale_rewards does not apply to GDPO's aggregation, as in TRL
    ],
)
def test_advantages_by_aggregation_match_hand_computation_and_trl(
    tmp_path, tokenizer, make_args, aggregation, scale_rewards
):
    settings = dict(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards)
    args = make_args(num_generations=G, per_device_train_batch_size=6, reward_weights=WEIGHTS, beta=0.0, **settings)
    trainer = _trainer(tokenizer, args, reward_funcs=[digit_fraction_reward, digit_fraction_reward])
    rewards_per_func = torch.tensor(REWARDS_PER_FUNC)  # (6, 2)
    trainer.rewards.score = lambda *args, **kwargs: rewards_per_func.clone()
    rows = [row for row in make_prompt_dataset(2) for _ in range(G)]
    advantages = trainer.generate_and_score(rows, mode="train").advantages

    expected = torch.tensor(_hand_advantages(aggregation, scale_rewards))
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(advantages, _trl_advantages(tmp_path, tokenizer, rows, rewards_per_func, **settings))


def test_the_two_aggregations_differ_and_bad_values_are_refused(make_args):
    assert not torch.allclose(
        torch.tensor(_hand_advantages("sum_then_normalize", "group")),
        torch.tensor(_hand_advantages("normalize_then_sum", "group")),
    )
    with pytest.raises(ValueError, match="multi_objective_aggregation='sum' is not one of"):
        check_settings(make_args(multi_objective_aggregation="sum"))


# --- sync_ref_model (TR-DPO) ---


def test_sync_ref_model_mixes_the_frozen_copy(tokenizer, make_args):
    alpha = 0.3
    args = make_args(sync_ref_model=True, ref_model_mixup_alpha=alpha, ref_model_sync_steps=1, max_steps=1, beta=0.04)
    trainer = _trainer(tokenizer, args)
    assert trainer.reference.mode == "copy"
    old_reference = {name: p.detach().clone() for name, p in trainer.reference.model.named_parameters()}
    trainer.train()  # one optimizer step, then one sync
    policy = dict(trainer.model.named_parameters())
    for name, parameter in trainer.reference.model.named_parameters():
        expected = alpha * policy[name].detach() + (1 - alpha) * old_reference[name]
        torch.testing.assert_close(parameter, expected, rtol=0, atol=1e-7)
    moved = [name for name in policy if not torch.equal(policy[name], old_reference[name])]
    assert moved  # the policy did move, so the mix is not the old reference


def test_sync_ref_model_mixes_the_snapshot_adapter(tokenizer, make_args):
    alpha = 0.6
    args = make_args(sync_ref_model=True, ref_model_mixup_alpha=alpha, ref_model_sync_steps=1, max_steps=1, beta=0.04)
    trainer = _trainer(tokenizer, args, peft_config=LoraConfig(**LORA))
    assert trainer.reference.mode == "snapshot_adapter"  # `auto` with sync_ref_model on a PEFT model
    parameters = lambda adapter: {  # noqa: E731
        name.replace(f".{adapter}.", "."): p for name, p in trainer.model.named_parameters() if f".{adapter}." in name
    }
    old_snapshot = {name: p.detach().clone() for name, p in parameters(SNAPSHOT_ADAPTER).items()}
    trainer.train()
    policy, snapshot = parameters("default"), parameters(SNAPSHOT_ADAPTER)
    assert snapshot.keys() == policy.keys() and len(policy) == 8  # A and B of q_proj, v_proj in 2 layers
    for name, parameter in snapshot.items():
        expected = alpha * policy[name].detach() + (1 - alpha) * old_snapshot[name]
        torch.testing.assert_close(parameter, expected, rtol=0, atol=1e-7)
    assert any(not torch.equal(policy[name], old_snapshot[name]) for name in policy)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(ref_model_mode="disabled_adapter"), "ref_model_mode='disabled_adapter' has no reference weights.*"
         "'snapshot_adapter'"),
        (dict(beta=0.0), "no KL term uses the reference"),
        (dict(ref_model_mixup_alpha=1.5), r"ref_model_mixup_alpha=1.5 must be in \[0, 1\]"),
    ],
)  # fmt: skip
def test_sync_ref_model_is_refused_where_it_cannot_work(make_args, settings, message):
    with pytest.raises(ValueError, match=message):
        check_settings(make_args(sync_ref_model=True, **settings))


# --- cast_lm_head_to_fp32 ---


def test_fp32_lm_head_projects_bf16_hidden_states_in_fp32(tokenizer):
    model = make_tiny_model("qwen2", tokenizer).to(torch.bfloat16).eval()
    input_ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state  # (2, 9, H) bf16
        expected_logits = hidden.float() @ model.lm_head.weight.float().T  # (2, 9, V) an fp32 projection
        bf16_logps, _ = completion_logps_and_entropies(model, input_ids, attention_mask, 8)
        cast_lm_head_to_fp32(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision does not put it back in bf16
            logits = model.lm_head(hidden)
        logps, _ = completion_logps_and_entropies(model, input_ids, attention_mask, 8)
        generation_logits = model(input_ids=input_ids).logits  # the model's own forward, as generate calls it
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    torch.testing.assert_close(generation_logits, expected_logits, rtol=0, atol=0)
    expected_logps = torch.log_softmax(expected_logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected_logps, rtol=0, atol=1e-6)
    assert (bf16_logps - expected_logps).abs().max() > 1e-5  # without the option the bf16 projection rounds


def test_fp32_lm_head_with_tied_embeddings_and_refused_on_a_lora_lm_head(tokenizer):
    model = make_tiny_model("qwen2", tokenizer, tie_word_embeddings=True).to(torch.bfloat16)
    cast_lm_head_to_fp32(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens(torch.tensor([[5, 6]])).dtype == torch.bfloat16  # activations keep their dtype
    lora_head = get_peft_model(make_tiny_model("qwen2", tokenizer), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(
        ValueError, match="`cast_lm_head_to_fp32=True` is not supported when the lm_head carries a PEFT"
    ):
        cast_lm_head_to_fp32(lora_head)


def test_trainer_casts_the_policy_and_reference_heads(tokenizer, make_args):
    trainer = _trainer(tokenizer, make_args(cast_lm_head_to_fp32=True, beta=0.04, max_steps=1))
    assert trainer.reference.mode == "copy"
    hidden = torch.randn(3, 32).to(torch.bfloat16)
    for model in (trainer.model, trainer.reference.model):
        assert model.lm_head.forward.__self__ is model.lm_head  # the copy's head runs its own weights
        assert model.lm_head.weight.dtype == torch.float32
        torch.testing.assert_close(model.lm_head(hidden), hidden.float() @ model.lm_head.weight.T, rtol=0, atol=0)
    trainer.train()  # a step runs with the float32 heads


# --- model_init_kwargs["dtype"], as TRL loads a model id ---


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        ({}, torch.float32),  # not set: float32, not the checkpoint's bf16
        ({"dtype": "bfloat16"}, torch.bfloat16),
        ({"dtype": "float16"}, torch.float16),
        ({"dtype": "float32"}, torch.float32),
        ({"dtype": "auto"}, torch.bfloat16),  # the checkpoint's own
        ({"dtype": torch.float16}, torch.float16),
    ],
)
def test_model_dtype_as_trl_loads_it(monkeypatch, tmp_path, tokenizer, kwargs, dtype):
    from grpo_ext import cpu

    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: True)  # TRL's rule; a slow CPU's `auto` is in test_cpu.py
    path = tmp_path / "bf16-model"
    make_tiny_model("qwen2", tokenizer).to(torch.bfloat16).save_pretrained(path)
    assert load_causal_lm(str(path), kwargs).dtype == dtype
    assert create_model_from_path(str(path), **kwargs).dtype == dtype  # TRL's loader agrees


def test_bad_model_dtype_is_an_error_naming_the_field(tmp_path, tokenizer):
    path = save_tiny_model(tmp_path / "model")
    with pytest.raises(ValueError, match=r"model_init_kwargs\['dtype'\]='fp32' is not a dtype"):
        load_causal_lm(path, {"dtype": "fp32"})
    with pytest.raises(ValueError, match="Invalid `dtype`"):  # TRL refuses it too
        create_model_from_path(path, dtype="fp32")
    args = GRPOExtConfig(
        output_dir=str(tmp_path / "out"), model_init_kwargs={"dtype": "fp32"}, bf16=False, use_cpu=True
    )
    with pytest.raises(ValueError, match=r"model_init_kwargs\['dtype'\]='fp32'"):  # at start, before loading
        check_settings(args)
