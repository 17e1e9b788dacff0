import asyncio
import logging
import math

import pytest
import torch

import grpo_ext.trainer
from grpo_ext.reward_scoring import RewardFunctionError, RewardScorer
from grpo_ext.rollout import completion_mask_after_eos


def test_columns_none_and_weights():
    received = {}

    def reads_columns(prompts, completions, completion_ids, answer, trainer_state, **kwargs):
        received.update(answer=answer, trainer_state=trainer_state)
        return [1.0 if c == a else None for c, a in zip(completions, answer)]

    def constant(completions, **kwargs):
        return [2] * len(completions)

    scorer = RewardScorer([reads_columns, constant], reward_weights=[1.0, 0.5])
    rewards = scorer.score(["p", "p"], ["4", "5"], [[1], [2]], {"answer": ["4", "4"], "trainer_state": "state"})
    assert received == {"answer": ["4", "4"], "trainer_state": "state"}
    assert rewards[0].tolist() == [1.0, 2.0] and math.isnan(rewards[1, 0])
    torch.testing.assert_close(scorer.weighted_sum(rewards), torch.tensor([2.0, 1.0]))  # NaN skipped, not zeroed


def test_async_functions_run_concurrently():
    """Each function waits until the other has started: awaited one after the other, this would time out."""
    events = {}

    def started(name):  # events belong to the loop the scorer runs, so they are made inside it
        return events.setdefault(name, asyncio.Event())

    async def first(completions, **kwargs):
        started("first").set()
        await asyncio.wait_for(started("second").wait(), timeout=5)
        return [1.0] * len(completions)

    async def second(completions, **kwargs):
        started("second").set()
        await asyncio.wait_for(started("first").wait(), timeout=5)
        return [0.5] * len(completions)

    rewards = RewardScorer([first, second]).score(["p"], ["c"], [[1]], {})
    assert rewards.tolist() == [[1.0, 0.5]]


def test_empty_reward_funcs_is_refused():
    with pytest.raises(ValueError, match="^No reward source provided"):
        RewardScorer([])


def test_completion_mask_stops_after_the_first_eos():
    completion_ids = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 9, 9, 9]])
    mask, truncated = completion_mask_after_eos(completion_ids, eos_token_ids=[3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_nonfinite_reward_is_an_error_naming_the_function_the_row_and_the_count():
    def broken(completions, **kwargs):
        return [1.0, math.inf, None, math.nan]

    with pytest.raises(RewardFunctionError, match=r"'broken' returned inf on row 1 .*2 non-finite reward\(s\) of 4"):
        RewardScorer(broken).score(["a", "b", "c", "d"], ["1", "2", "3", "4"], [[1]] * 4, {})

    def as_tensor(completions, **kwargs):
        return torch.tensor([-math.inf])

    with pytest.raises(RewardFunctionError, match=r"'as_tensor' returned -inf on row 0"):
        RewardScorer(as_tensor).score(["a"], ["1"], [[1]], {})


def test_nonfinite_rewards_dropped_are_left_out_and_counted():
    def broken(completions, **kwargs):
        return [1.0, math.inf, None, -math.inf]

    def constant(completions, **kwargs):
        return [0.5] * len(completions)

    scorer = RewardScorer([broken, constant], nonfinite_rewards="drop")
    rewards = scorer.score(["a"] * 4, ["1"] * 4, [[1]] * 4, {})
    assert rewards[0].tolist() == [1.0, 0.5] and torch.isnan(rewards[1:, 0]).all()
    assert scorer.nonfinite_counts == [2, 0]  # None is not counted: it means "not scored"
    torch.testing.assert_close(scorer.weighted_sum(rewards), torch.tensor([1.5, 0.5, 0.5, 0.5]))


def test_each_function_gets_its_own_copy_of_the_inputs():
    seen = {}

    def vandal(prompts, completions, completion_ids, answer, **kwargs):
        prompts[0][0]["content"] = "changed"
        completions[0][0]["content"] = "changed"
        completion_ids[0].append(99)
        answer[0] = "changed"
        completions.append("extra")
        return [0.0] * len(prompts)

    def reader(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer)
        return [1.0] * len(prompts)

    prompts = [[{"role": "user", "content": "1+1="}]]
    completions = [[{"role": "assistant", "content": "2"}]]
    RewardScorer([vandal, reader]).score(prompts, completions, [[5]], {"answer": ["2"]})
    assert seen == {"prompts": prompts, "completions": completions, "completion_ids": [[5]], "answer": ["2"]}
    assert prompts[0][0]["content"] == "1+1=" and completions == [[{"role": "assistant", "content": "2"}]]


def test_a_raising_function_is_called_once_not_again_row_by_row():
    calls = []

    def fragile(prompts, **kwargs):
        calls.append(len(prompts))
        raise ZeroDivisionError("division by zero")

    with pytest.raises(RewardFunctionError, match=r"'fragile' raised ZeroDivisionError: division by zero") as caught:
        RewardScorer(fragile).score(["a", "b", "c"], ["1", "2", "3"], [[1]] * 3, {})
    assert calls == [3]
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_rows_no_function_scored_are_warned_about_as_trl_does(caplog):
    def only_first(completions, **kwargs):
        return [1.0] + [None] * (len(completions) - 1)

    with caplog.at_level(logging.WARNING, logger="grpo_ext.reward_scoring"):
        RewardScorer(only_first).score(["p0", "p1", "p2"], ["c0", "c1", "c2"], [[1]] * 3, {"answer": ["0", "1", "2"]})
    assert "All reward functions returned None for the following kwargs" in caplog.text
    # TRL's condition (every function None on a row) and row: its columns, prompt and completion; no callbacks
    assert "{'answer': '1', 'prompt': 'p1', 'completion': 'c1'}" in caplog.text and "2 of 3 completions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grpo_ext.reward_scoring"):
        RewardScorer([only_first, lambda completions, **kwargs: [0.0] * len(completions)]).score(
            ["p0", "p1"], ["c0", "c1"], [[1]] * 2, {}
        )
    assert "All reward functions returned None" not in caplog.text  # one function scored every row


def test_reward_functions_log_metrics_and_table_columns_as_in_trl():
    """TRL 1.16 passes `log_metric(name, value)` and `log_extra(column, values)` to every reward function; what they
    log in one `score` call is kept, shared (not copied) between functions, for the trainer to log."""

    def lengths(completions, log_metric, log_extra, **kwargs):
        log_metric("mean_length", sum(map(len, completions)) / len(completions))
        log_metric("mean_length", 1.0)  # a second value in the same batch: averaged with the first by the trainer
        log_extra("length", [len(c) for c in completions])
        return [0.0] * len(completions)

    async def checker(completions, log_extra, **kwargs):
        log_extra("is_long", [len(c) > 2 for c in completions])
        return [1.0] * len(completions)

    scorer = RewardScorer([lengths, checker])
    scorer.score(["p", "p"], ["ab", "abcd"], [[1], [2]], {})
    assert scorer.logged_metrics == {"mean_length": [3.0, 1.0]}
    assert scorer.logged_columns == {"length": [2, 4], "is_long": [False, True]}
    scorer.score(["p"], ["abc"], [[1]], {})  # each call starts afresh
    assert scorer.logged_metrics == {"mean_length": [3.0, 1.0]} and scorer.logged_columns["length"] == [3]
    assert scorer.required_columns() == {"lengths": [], "checker": []}  # not taken for dataset columns

    def bad_metric(completions, log_metric, **kwargs):
        log_metric("accuracy", [1.0, 0.0])
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"log_metric\('accuracy', \[1.0, 0.0\]\): the value is a list"):
        RewardScorer(bad_metric).score(["p"] * 2, ["a", "b"], [[1]] * 2, {})

    def short_column(completions, log_extra, **kwargs):
        log_extra("note", ["only one"])
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"log_extra\('note', ...\) was given 1 values .* batch of 2"):
        RewardScorer(short_column).score(["p"] * 2, ["a", "b"], [[1]] * 2, {})


def test_logged_metric_is_averaged_into_the_logs_and_column_added_to_the_completions_table(
    tokenizer, make_args, monkeypatch
):
    from conftest import tiny_trainer

    def logging_reward(completions, trainer_state, log_metric, log_extra, **kwargs):
        step = trainer_state.global_step
        log_metric("my_metric", 2.0 * step + 1)
        log_metric("my_metric", 2.0 * step + 3)  # mean of the rollout: 2 * step + 2
        log_extra("my_col", [f"len={len(c)}" for c in completions])
        return [float(len(c)) for c in completions]

    trainer = tiny_trainer(tokenizer, make_args(max_steps=2, log_completions=True), logging_reward)
    tables = []
    table = grpo_ext.trainer.log_completions_table
    monkeypatch.setattr(
        grpo_ext.trainer, "log_completions_table", lambda samples, *a: (tables.append(samples), table(samples, *a))
    )
    trainer.train()
    assert [entry["my_metric"] for entry in trainer.state.log_history[:2]] == [2.0, 4.0]
    assert len(tables) == 2
    for samples in tables:
        assert list(samples)[-4:] == ["logging_reward", "my_col", "reward", "advantage"]  # TRL's order
        assert samples["my_col"] == [f"len={len(c)}" for c in samples["completion"]]
