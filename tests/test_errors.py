"""Bad input fails before or at the first step, naming the argument, column, reward function or row, and the fix."""

import pytest
from conftest import tiny_trainer as _trainer
from datasets import Dataset, IterableDataset

from grpo_ext import GRPOExtTrainer
from grpo_ext.data import ITERABLE_ROWS_CHECKED, check_dataset, check_prompts
from grpo_ext.reward_scoring import RewardFunctionError
from grpo_ext.settings import check_settings
from grpo_ext.testing import (
    digit_fraction_reward,
    make_prompt_dataset,
    make_tiny_model,
    make_tokenizer,
    record_trained_batches,
)


def test_missing_prompt_column(tokenizer, make_args):
    dataset = make_prompt_dataset(8).rename_column("prompt", "question")
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column.*rename_column"):
        _trainer(tokenizer, make_args(), dataset=dataset)


def test_no_train_dataset_without_an_environment(tokenizer, make_args):
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: the first
            b: the second
        """
        return a + b

    # tools alone write no prompt either (checked after the tools themselves, as in TRL)
    for tools, chat_tokenizer in ((None, tokenizer), ([add], make_tokenizer(tool_calling=True))):
        with pytest.raises(ValueError, match=r"^`train_dataset` is required unless an `environment_factory`"):
            GRPOExtTrainer(make_tiny_model("qwen2", chat_tokenizer), digit_fraction_reward, args=make_args(),
                           processing_class=chat_tokenizer, tools=tools)  # fmt: skip


def test_reward_function_needing_a_missing_column(tokenizer, make_args):
    def accuracy(completions, solution, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"'accuracy' takes \['solution'\].*no such column"):
        _trainer(tokenizer, make_args(), reward_funcs=accuracy)


def test_fewer_than_two_generations(make_args):
    with pytest.raises(ValueError, match=r"num_generations=1.*at least 2"):
        make_args(num_generations=1, per_device_train_batch_size=4)


def test_batch_not_divisible_by_group_size(make_args):
    with pytest.raises(ValueError, match=r"not divisible by num_generations=4.*per_device_train_batch_size=4"):
        make_args(per_device_train_batch_size=6, num_generations=4)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epsilon", 0.0, "clipping ranges must be > 0"),
        ("beta", -0.1, "beta=-0.1 must be >= 0"),
        ("loss_type", "ppo", "loss_type='ppo' is not one of"),
        ("importance_sampling_level", "word", "importance_sampling_level='word'"),
        ("scale_rewards", "median", "scale_rewards='median'"),
        ("temperature", 0.0, "temperature=0.0 must be > 0"),
        ("top_p", 1.5, r"top_p=1.5 must be in \(0, 1\]"),
    ],
)
def test_impossible_settings(make_args, field, value, message):
    with pytest.raises(ValueError, match=message):  # the config's own checks, or the modules' at trainer start
        check_settings(make_args(**{field: value}))


def test_module_rules_are_checked_at_trainer_start(tokenizer, make_args):
    with pytest.raises(ValueError, match="loss_type='ppo' is not one of"):
        _trainer(tokenizer, make_args(loss_type="ppo"))


def test_reward_weights_of_the_wrong_length(tokenizer, make_args):
    with pytest.raises(ValueError, match=r"^Number of reward weights \(2\) must match number of reward functions"):
        _trainer(tokenizer, make_args(reward_weights=[1.0, 2.0]))


def test_reward_function_returning_the_wrong_length(tokenizer, make_args):
    def too_short(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(RewardFunctionError, match=r"'too_short' returned 7 rewards for 8 completions"):
        _trainer(tokenizer, make_args(), reward_funcs=too_short).train()


def test_reward_function_returning_a_non_number(tokenizer, make_args):
    def stringly(completions, **kwargs):
        return [1.0, 0.0, "yes"] + [0.0] * (len(completions) - 3)

    with pytest.raises(RewardFunctionError, match=r"'stringly' returned 'yes' \(str\) on row 2.*int, float or None"):
        _trainer(tokenizer, make_args(), reward_funcs=stringly).train()


def test_reward_function_that_raises_names_itself_and_is_not_called_again(tokenizer, make_args):
    calls = []

    def fragile(prompts, completions, **kwargs):
        calls.append(len(prompts))
        return [1.0 / (0 if prompt == prompts[-1] else 1) for prompt in prompts]  # fails on the last group's prompt

    with pytest.raises(RewardFunctionError, match=r"'fragile' raised ZeroDivisionError.*batch of 8") as caught:
        _trainer(tokenizer, make_args(), reward_funcs=fragile).train()
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert calls == [8]  # once for the batch, never once per row


def test_not_a_reward_function(tokenizer, make_args):
    with pytest.raises(TypeError, match=r"reward_funcs\[0\] is a int"):
        _trainer(tokenizer, make_args(), reward_funcs=[3])


def test_trl_config_is_refused_with_the_fix(tokenizer, tmp_path):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True)
    with pytest.raises(TypeError, match="needs a GRPOExtConfig"):
        _trainer(tokenizer, args)


def test_eval_batch_not_divisible_by_group_size(tokenizer, make_args):
    args = make_args(per_device_eval_batch_size=6)
    trainer = _trainer(tokenizer, args)  # no eval set yet: fine
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size=6 .* not divisible by num_generations=4"):
        trainer.evaluate(make_prompt_dataset(8))
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size=6"):
        GRPOExtTrainer(
            make_tiny_model("qwen2", tokenizer),
            digit_fraction_reward,
            args=args,
            train_dataset=make_prompt_dataset(8),
            eval_dataset=make_prompt_dataset(8),
            processing_class=tokenizer,
        )


# --- Prompt contents, checked at start ---


def _with_prompt(row, prompt, conversational=False):
    """make_prompt_dataset(8) with the prompt of `row` replaced."""
    rows = make_prompt_dataset(8, conversational=conversational).to_list()
    rows[row]["prompt"] = prompt
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    "dataset, message",
    [
        (lambda: _with_prompt(5, None), r"train_dataset row 5: .*it is None \(NoneType\)"),
        (lambda: _with_prompt(5, ""), r"train_dataset row 5: .*it is empty.*filter"),
        (lambda: _with_prompt(5, "   \n"), r"train_dataset row 5: .*it is empty"),
        (lambda: Dataset.from_dict({"prompt": [""] * 8}), r"train_dataset row 0: .*it is empty"),
        (lambda: Dataset.from_dict({"prompt": list(range(8))}), r"train_dataset row 0: .*it is 0 \(int\)"),
        (lambda: Dataset.from_dict({"prompt": [["1+1=", "2+2="]] * 8}), r"row 0: .*message 0 is '1\+1=' \(str\)"),
        (
            lambda: _with_prompt(3, [{"role": "robot", "content": "1+1="}], conversational=True),
            r"train_dataset row 3: .*message 0 has role 'robot', not one of \('system', 'user', 'assistant', 'tool'\)",
        ),
        (
            lambda: _with_prompt(2, [{"role": "user", "content": ""}], conversational=True),
            r"train_dataset row 2: .*every message is empty",
        ),
    ],
    ids=["none", "empty", "blank", "all-empty", "int", "list-of-str", "unknown-role", "empty-chat"],
)
def test_unusable_prompts_are_named_at_start(tokenizer, make_args, dataset, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tokenizer, make_args(), dataset=dataset())


def test_prompts_of_two_kinds_are_refused():
    with pytest.raises(ValueError, match=r"train_dataset row 1: the prompt is chat but row 0 is text"):
        check_prompts(["1+1=", [{"role": "user", "content": "2+2="}]], "train_dataset")


def test_bad_eval_prompts_name_the_eval_dataset(tokenizer, make_args):
    with pytest.raises(ValueError, match=r"eval_dataset row 2: .*it is empty"):
        GRPOExtTrainer(
            make_tiny_model("qwen2", tokenizer), digit_fraction_reward, args=make_args(per_device_eval_batch_size=4),
            train_dataset=make_prompt_dataset(8), eval_dataset=_with_prompt(2, ""), processing_class=tokenizer,
        )  # fmt: skip


def test_a_prompt_longer_than_the_model_allows_is_named_with_the_limit(tokenizer, make_args):
    # the tiny model has 512 positions; max_completion_length=6 leaves 506 for the prompt
    with pytest.raises(
        ValueError, match=r"train_dataset row 3: the prompt is 600 tokens.*leave 506.*max_prompt_length=506"
    ):
        _trainer(tokenizer, make_args(), dataset=_with_prompt(3, "1" * 600))
    with pytest.raises(ValueError, match=r"row 4: the prompt is 5\d\d tokens"):  # the chat template counts too
        _trainer(tokenizer, make_args(), dataset=_with_prompt(4, [{"role": "user", "content": "1" * 500}], True))
    with pytest.raises(ValueError, match=r"max_prompt_length=510 \+ max_completion_length=6 exceeds .* <= 506"):
        _trainer(tokenizer, make_args(max_prompt_length=510), dataset=_with_prompt(3, "1" * 600))


def test_max_prompt_length_cuts_long_prompts_from_the_left(tokenizer, make_args):
    long_prompts = Dataset.from_dict({"prompt": [f"{i}" + "9" * 600 + f"{i}+1=" for i in range(8)]})
    trainer = _trainer(tokenizer, make_args(max_prompt_length=10, max_steps=1), dataset=long_prompts)
    trained = record_trained_batches(trainer)
    trainer.train()
    (batch,) = trained
    prompt_ids = batch.prompt_ids
    assert prompt_ids.size(1) == 10
    assert tokenizer.decode(prompt_ids[0]).endswith("+1=")  # the end of the prompt is kept, its start cut
    with pytest.raises(ValueError, match=r"max_prompt_length=0 must be >= 1"):
        make_args(max_prompt_length=0)


def test_an_iterable_dataset_is_checked_on_its_first_rows(make_args):
    def rows():
        yield {"prompt": "1+1="}
        yield {"prompt": None}
        for _ in range(ITERABLE_ROWS_CHECKED - 2):
            yield {"prompt": "2+2="}
        raise AssertionError("read past the rows checked")

    with pytest.raises(ValueError, match=r"train_dataset row 1: .*it is None"):
        check_dataset(IterableDataset.from_generator(rows), "train_dataset", make_args(), {})
