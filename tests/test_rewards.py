import asyncio
import math

import pytest
import torch

from grpo_ext.rewards import RewardScorer
from grpo_ext.sampling import completion_mask_after_eos


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
    with pytest.raises(ValueError, match="reward_funcs is empty"):
        RewardScorer([])


def test_completion_mask_stops_after_the_first_eos():
    completion_ids = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 9, 9, 9]])
    mask, truncated = completion_mask_after_eos(completion_ids, eos_token_ids=[3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
