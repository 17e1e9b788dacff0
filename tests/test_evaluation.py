"""Task metrics: pass@k / maj@k against hand computations, the trainer's evaluation through the rollout engine
(greedy answers equal to `generate`'s), and the best checkpoint by a task metric through rotation and resume."""

import json
import math

import pytest
import torch
from conftest import tiny_trainer
from datasets import Dataset
from safetensors.torch import load_file

from grpo_ext.evaluation import majority_index, pass_at_k, sampled_metrics, task_metrics
from grpo_ext.rollout import token_lists_until_stop
from grpo_ext.testing import make_prompt_dataset

# --- the metrics, by hand ---


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 1 - 3/10
        (4, 0, 2, 0.0),
        (4, 3, 2, 1.0),  # only one wrong sample: every pair holds a correct one
        (3, 1, 3, 1.0),  # n = k: "any of the k"
    ],
)
def test_pass_at_k_is_chens_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@3 needs at least 3 samples"):
        pass_at_k(2, 1, 3)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_index(["", "5", "3", "5"]) == 1
    assert majority_index(["", "", "7"]) == 2  # two samples without an answer do not outvote one with it
    assert majority_index(["4", "9"]) == 0  # a tie: the answer seen first
    assert majority_index(["", ""]) == 0


def test_sampled_metrics_by_hand():
    scores = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    keys = [["12", "13", "13"], ["", "", ""], ["8", "8", "9"]]
    metrics = sampled_metrics(scores, keys)
    assert metrics["sampled_pass@1"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    assert metrics["pass@3"] == pytest.approx(2 / 3)  # problems 1 and 3 have a correct sample
    # votes: "13" (wrong) wins problem 1, nothing for problem 2 (sample 0, wrong), "8" (right) wins problem 3
    assert metrics["maj@3"] == pytest.approx(1 / 3)


def test_task_metrics_name_each_function_and_count_none_as_wrong():
    greedy = torch.tensor([[1.0, 0.5], [float("nan"), 1.0]])  # (N=2, K=2)
    sampled = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [float("nan"), 1.0]]])  # (N=2, k=2, K=2)
    keys = [["3", "4"], ["5", "5"]]
    metrics = task_metrics(["exact", "close"], greedy, sampled, keys)
    assert metrics["pass@1/exact"] == pytest.approx(0.5)  # NaN (a None score) counts as 0
    assert metrics["pass@1/close"] == pytest.approx(0.75)
    assert metrics["sampled_pass@1/exact"] == pytest.approx((0.5 + 0.5) / 2)
    assert metrics["pass@2/exact"] == pytest.approx(1.0)
    assert metrics["pass@2/close"] == pytest.approx(0.5)
    assert metrics["maj@2/exact"] == pytest.approx((1.0 + 1.0) / 2)  # "3" (tie, first) and "5"
    assert metrics["maj@2/close"] == pytest.approx((0.0 + 1.0) / 2)


# --- the trainer's evaluation ---


def recording_metric(seen: list):
    """A task metric that keeps what it was given and scores a completion by its first character being a digit."""

    def starts_with_digit(prompts, completions, completion_ids, **kwargs):
        seen.append((list(prompts), list(completions), [list(ids) for ids in completion_ids]))
        return [1.0 if c[:1].isdigit() else 0.0 for c in completions]

    return starts_with_digit


def test_greedy_pass_at_1_scores_the_answers_generate_gives(tokenizer, make_args):
    """eval_pass@1 goes through the rollout engine (prefix sharing, dropped rows): its answers are `generate`'s."""
    seen = []
    metric = recording_metric(seen)
    eval_set = make_prompt_dataset(5, seed=3)
    args = make_args(eval_reward_funcs=["starts_with_digit"], eval_task_metrics_only=True, per_device_eval_batch_size=2)
    trainer = tiny_trainer(tokenizer, args, reward_funcs=metric, eval_dataset=eval_set)

    metrics = trainer.evaluate()

    ((prompts, completions, completion_ids),) = seen  # one call for every problem
    assert prompts == list(eval_set["prompt"])  # every problem once, in order
    model = trainer.model.eval()
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    generated = model.generate(**encoded, generation_config=trainer.generation_config, do_sample=False)
    expected_ids = token_lists_until_stop(generated[:, encoded["input_ids"].size(1) :], trainer.eos_token_ids)
    assert completion_ids == expected_ids
    expected = sum(1.0 for c in tokenizer.batch_decode(expected_ids, skip_special_tokens=True) if c[:1].isdigit())
    assert metrics["eval_pass@1/starts_with_digit"] == pytest.approx(expected / 5)
    assert metrics["eval_task_problems"] == 5 and metrics["eval_task_runtime"] > 0
    assert "eval_loss" not in metrics  # eval_task_metrics_only: no evaluation rollout


def test_sampled_metrics_use_k_samples_of_each_problem(tokenizer, make_args):
    seen = []
    metric = recording_metric(seen)
    eval_set = make_prompt_dataset(3, seed=4)
    args = make_args(eval_reward_funcs=["starts_with_digit"], eval_num_samples=4, per_device_eval_batch_size=8)
    trainer = tiny_trainer(tokenizer, args, reward_funcs=metric, eval_dataset=eval_set)
    seen.clear()

    metrics = trainer.evaluate()

    # TRL's evaluation rollout ran too (its reward call), then the task metric: greedy (3 answers), sampled (3 x 4)
    task_calls = [call for call in seen if len(call[0]) in (3, 12)]
    greedy, sampled = task_calls[-2], task_calls[-1]
    assert greedy[0] == list(eval_set["prompt"])
    assert sampled[0] == [p for p in eval_set["prompt"] for _ in range(4)]  # each problem's 4 samples in a row
    solved = [[c[:1].isdigit() for c in sampled[1][i * 4 : (i + 1) * 4]] for i in range(3)]
    assert metrics["eval_sampled_pass@1/starts_with_digit"] == pytest.approx(sum(map(sum, solved)) / 12)
    assert metrics["eval_pass@4/starts_with_digit"] == pytest.approx(sum(map(any, solved)) / 3)
    assert "eval_maj@4/starts_with_digit" in metrics and "eval_loss" in metrics  # TRL's metrics beside them


def test_a_task_metric_name_that_loads_nothing_is_refused_at_start(tokenizer, make_args):
    args = make_args(eval_reward_funcs=["no_such_metric"])
    with pytest.raises(ValueError, match="eval_reward_funcs: 'no_such_metric' is not a reward function of this"):
        tiny_trainer(tokenizer, args, eval_dataset=make_prompt_dataset(4))


def needs_gold(completions, gold=None, **kwargs):
    """A task metric that leaves a completion unscored (None) without a `gold` column."""
    return [
        None if g is None else float(c.strip() == g) for c, g in zip(completions, gold or [None] * len(completions))
    ]


def test_a_task_metric_that_scores_nothing_is_warned_about(tokenizer, make_args, caplog):
    args = make_args(eval_reward_funcs=["test_evaluation:needs_gold"], eval_task_metrics_only=True)
    trainer = tiny_trainer(tokenizer, args, eval_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="]}))
    with caplog.at_level("WARNING", logger="grpo_ext.evaluation"):
        metrics = trainer.evaluate()
        trainer.evaluate()
    assert metrics["eval_pass@1/test_evaluation:needs_gold"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if "scored none of the 2 eval problems" in r.getMessage()]
    assert len(warnings) == 1 and "needs_gold" in warnings[0] and "['prompt']" in warnings[0]  # said once


# --- the best checkpoint by a task metric ---

# The task metric each evaluation reports, by step: step 2 is the best, later steps are worse (it is also a training
# reward, so that eval_reward_funcs can name it)
SCHEDULE = {1: 0.2, 2: 0.9, 3: 0.4, 4: 0.3, 5: 0.5, 6: 0.1}


def scheduled(completions, trainer_state, **kwargs):
    return [SCHEDULE.get(trainer_state.global_step, 0.0)] * len(completions)


def best_checkpoint_args(make_args, max_steps=4):
    return make_args(
        max_steps=max_steps,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        eval_reward_funcs=["grpo_ext.testing.digit_fraction_reward", "scheduled"],
        eval_task_metrics_only=True,
        metric_for_best_model="eval_pass@1/scheduled",
        load_best_model_at_end=True,
    )


def lora_trainer(tokenizer, args):
    from peft import LoraConfig

    from grpo_ext.testing import digit_fraction_reward

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return tiny_trainer(
        tokenizer,
        args,
        reward_funcs=[digit_fraction_reward, scheduled],
        eval_dataset=make_prompt_dataset(4, seed=2),
        peft_config=lora,
    )


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_the_best_checkpoint_survives_rotation_and_resume_and_is_what_is_saved(tokenizer, make_args, tmp_path):
    args = best_checkpoint_args(make_args)
    output_dir = tmp_path / "out"
    trainer = lora_trainer(tokenizer, args)
    trainer.train()

    # save_total_limit=2 keeps the best (step 2) beside the newest
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(0.9) and state["best_global_step"] == 2
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    # load_best_model_at_end: the model saved at the end is step 2's adapter
    best = adapter_weights(output_dir / "checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    final = adapter_weights(tmp_path / "final")
    assert best.keys() == final.keys()
    assert all(torch.equal(best[name], final[name]) for name in best)
    last = adapter_weights(output_dir / "checkpoint-4")
    assert any(not torch.equal(best[name], last[name]) for name in best)  # the last one differed

    # resumed for 2 more steps (worse than step 2 again): the best is still step 2, still kept
    resumed = lora_trainer(tokenizer, best_checkpoint_args(make_args, max_steps=6))
    resumed.train(resume_from_checkpoint=True)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    assert resumed.state.best_global_step == 2 and resumed.state.best_metric == pytest.approx(0.9)
    resumed.save_model(str(tmp_path / "final_resumed"))
    again = adapter_weights(tmp_path / "final_resumed")
    assert all(torch.equal(best[name], again[name]) for name in best)


def test_an_evaluation_before_training_stays_in_the_log_history(tokenizer, make_args):
    args = make_args(max_steps=1, eval_reward_funcs=["digit_fraction_reward"], eval_task_metrics_only=True)
    trainer = tiny_trainer(tokenizer, args, eval_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="]}))
    before = trainer.evaluate()
    trainer.train()
    first = trainer.state.log_history[0]
    assert (
        first["step"] == 0 and first["eval_pass@1/digit_fraction_reward"] == before["eval_pass@1/digit_fraction_reward"]
    )


# --- reward hacking seen by the run doctor through the task metric ---


def rising_reward(completions, trainer_state, **kwargs):
    """The training reward climbs step after step (with some spread, so groups have a signal)."""
    return [0.2 * trainer_state.global_step + 0.01 * (i % 2) for i in range(len(completions))]


def falling_task(completions, trainer_state, **kwargs):
    """... while the held-out task metric falls."""
    return [1.0 - 0.2 * trainer_state.global_step] * len(completions)


def test_reward_rising_while_the_task_metric_falls_is_called_reward_hacking(tokenizer, make_args, caplog):
    args = make_args(
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        eval_reward_funcs=["test_evaluation:falling_task"],
        eval_task_metrics_only=True,
        metric_for_best_model="eval_pass@1/test_evaluation:falling_task",
    )
    trainer = tiny_trainer(tokenizer, args, reward_funcs=rising_reward, eval_dataset=make_prompt_dataset(4, seed=5))
    with caplog.at_level("WARNING", logger="grpo_ext.diagnosis"):
        trainer.train()

    flags = [e["doctor/reward_hacking"] for e in trainer.state.log_history if "doctor/reward_hacking" in e]
    assert flags[-1] == 1.0 and flags[0] == 0.0  # fires after two evaluations in a row saw it
    (warning,) = [r.getMessage() for r in caplog.records if "reward hacking" in r.getMessage()]
    assert "eval_pass@1/test_evaluation:falling_task" in warning and "0.6" in warning  # the metric and its values
