"""On a task where a random policy scores about 0.1, GRPO must push the mean reward above 0.7.

Guards the sign and scale of the whole objective: a flipped advantage or a loss normalised wrongly by orders of
magnitude would not learn this in the step budget.
"""

import pytest

from grpo_ext import GRPOExtTrainer
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model

pytestmark = pytest.mark.slow  # a learning run: `make test-all` (and CI), not the fast tier


def test_mean_reward_rises_from_random_to_above_0_7(tokenizer, make_args):
    args = make_args(
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=4,
        learning_rate=3e-3,
        max_steps=150,
        logging_steps=10,
        beta=0.04,
    )
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer),
        digit_fraction_reward,
        args=args,
        train_dataset=make_prompt_dataset(64),
        processing_class=tokenizer,
    )
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert rewards[0] < 0.3, rewards  # starts near random (10 digits in a 90-token vocabulary)
    assert max(rewards[-3:]) > 0.7, rewards
    assert all(entry["kl"] >= 0 for entry in trainer.state.log_history if "kl" in entry)
