"""Nothing hangs, nothing is silently wrong: user code that never returns (tools, rewards, environments' reset), loss
settings that shrink the gradient without a word, logging that fails, user callables that fail or return the wrong
type, tools and environments with streams, bad rows deep in a stream, files and command lines given bad input, and
the leftovers of resuming, decoding settings and interrupted recipes.

A timeout test gives a tiny limit (0.2 s) to a function sleeping 30 s and checks the error or the metric, never the
elapsed time. A sync function is abandoned in a daemon thread, which keeps sleeping in the background.
"""

import asyncio
import logging
import os
import re
import time
import warnings
from pathlib import Path

import pytest
from conftest import tiny_trainer
from test_tools import G, call, make_trainer, rows_of, scripted

from grpo_ext import GRPOExtTrainer
from grpo_ext.concurrency import UserCodeTimeout, await_all, call_with_deadline
from grpo_ext.reward_scoring import RewardFunctionError, RewardScorer
from grpo_ext.testing import make_prompt_dataset, make_tiny_model, make_tokenizer
from grpo_ext.tools import EnvironmentCallError, Environments, run_tool_calls

RECIPE_CONFIG = Path(__file__).parent.parent / "recipes" / "configs" / "qwen2.5-math-1.5b-gsm8k-8gb.yaml"


@pytest.fixture
def tool_tokenizer():
    return make_tokenizer(tool_calling=True)


def sleeps(completions=None, **kwargs):
    """A tool or reward function that never returns in time."""
    time.sleep(30)


async def sleeps_async(completions=None, **kwargs):
    await asyncio.sleep(30)


async def blocks_the_loop(completions=None, **kwargs):
    time.sleep(30)  # sync sleep inside async def: nothing can cancel it


# --- 1. Timeouts of user code ---


def test_a_call_past_its_deadline_is_abandoned_and_named():
    with pytest.raises(UserCodeTimeout, match="slow thing did not return within 0.2 s"):
        call_with_deadline(sleeps, 0.2, "slow thing")
    assert call_with_deadline(lambda: 7, 0.2, "quick") == 7
    with pytest.raises(KeyError, match="raised in the worker"):  # the function's own error, unchanged
        call_with_deadline(lambda: {}["raised in the worker"], 0.2, "raising")
    outcomes = await_all([sleeps_async(), asyncio.sleep(0, result=3)], return_exceptions=True, timeout=0.2)
    assert isinstance(outcomes[0], UserCodeTimeout) and outcomes[1] == 3


def test_tools_that_never_return_give_the_model_an_error_result():
    def fast(x: int) -> int:
        return x + 1

    calls = [{"function": {"name": name, "arguments": {}}} for name in ("sleeps", "sleeps_async")]
    calls.append({"function": {"name": "fast", "arguments": {"x": 1}}})
    results, failures, timeouts = run_tool_calls(calls, [sleeps, sleeps_async, fast], timeout=0.2)
    assert results == [
        ("sleeps", {"error": "Tool sleeps did not return within 0.2 seconds."}),
        ("sleeps_async", {"error": "Tool sleeps_async did not return within 0.2 seconds."}),
        ("fast", 2),
    ]
    assert (failures, timeouts) == (2, 2)
    # An async tool blocking the event loop cannot be cancelled: the loop is abandoned, its calls time out
    blocked = [{"function": {"name": "blocks_the_loop", "arguments": {}}}]
    results, failures, timeouts = run_tool_calls(blocked, [blocks_the_loop], timeout=0.2)
    assert results == [("blocks_the_loop", {"error": "Tool blocks_the_loop did not return within 0.2 seconds."})]
    assert (failures, timeouts) == (1, 1)


def test_a_hanging_tool_in_a_rollout_is_counted_and_warned_about_once(tool_tokenizer, make_args, monkeypatch, caplog):
    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: the key
        """
        time.sleep(30)

    scripted(monkeypatch, tool_tokenizer, [call("lookup", key="a") + "<|im_end|>", "done<|im_end|>"])
    trainer = make_trainer(
        tool_tokenizer, make_args, tools=[lookup], args=dict(tool_timeout=0.2, max_completion_length=300)
    )
    seen = []
    trainer.rewards.funcs[0] = lambda completions, **kw: seen.extend(completions) or [0.0] * len(completions)
    with caplog.at_level(logging.WARNING, logger="grpo_ext.tools"):
        trainer.generate_and_score(rows_of(trainer), mode="train")
        trainer.generate_and_score(rows_of(trainer), mode="train")
    assert seen[0][1] == {"role": "tool", "name": "lookup", "content": str({"error": _late("lookup")})}
    metrics = trainer.recorder.values["train"]
    assert metrics["tools/timeout_frequency"] == [1.0, 1.0] and metrics["tools/failure_frequency"] == [1.0, 1.0]
    assert caplog.text.count("Tool 'lookup' did not return within tool_timeout=0.2 s") == 1


def _late(name: str) -> str:
    return f"Tool {name} did not return within 0.2 seconds."


@pytest.mark.parametrize("function", [sleeps, sleeps_async], ids=["sync", "async"])
def test_a_reward_function_that_never_returns_is_a_named_error(function):
    scorer = RewardScorer(function, timeout=0.2)
    with pytest.raises(RewardFunctionError, match=r"'sleeps(_async)?' did not return within reward_timeout=0.2 s"):
        scorer.score(["p"] * 2, ["a", "b"], [[1]] * 2, {})


def test_an_async_reward_function_blocking_its_event_loop_is_named():
    with pytest.raises(RewardFunctionError, match=r"'blocks_the_loop' had not finished .* blocks the event loop"):
        RewardScorer(blocks_the_loop, timeout=0.2).score(["p"], ["a"], [[1]], {})


def test_an_environment_reset_that_never_returns_is_a_named_error():
    class Sandbox:
        def reset(self, **row):
            time.sleep(30)

    environments = Environments(Sandbox)
    prompt = [{"role": "user", "content": "go"}]
    with pytest.raises(EnvironmentCallError, match=r"Sandbox.reset\(\*\*row\) did not return within "):
        environments.reset(environments.draw([{}]), [{}], [prompt], timeout=0.2)


def test_timeouts_are_config_fields_with_defaults(make_args):
    args = make_args()
    assert (args.tool_timeout, args.environment_reset_timeout, args.reward_timeout) == (60.0, 300.0, 600.0)
    assert make_args(tool_timeout=None).tool_timeout is None
    with pytest.raises(ValueError, match=r"reward_timeout=0 must be a number of seconds > 0, or None"):
        make_args(reward_timeout=0)


# --- 9. Loss-type settings ---


def test_cispo_with_the_default_upper_bound_is_warned_about(make_args):
    with pytest.warns(UserWarning, match=r"loss_type='cispo' with epsilon_high left at its default.* epsilon_high=5.0"):
        args = make_args(loss_type="cispo")
    assert args.epsilon_high == 0.2  # the default still applies, as in TRL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_args(loss_type="cispo", epsilon_high=5.0)  # set: no warning
        make_args(loss_type="cispo", epsilon_high=0.2)  # set to the default's value on purpose: no warning
        make_args(loss_type="dapo")  # the default is meant for the clipped loss types
    assert not [w for w in caught if "left at its default" in str(w.message)]


# --- 5. Logging never ends a run ---


def test_failing_completions_files_and_trackers_are_warnings_and_training_goes_on(tokenizer, make_args, caplog):
    from transformers.integrations import TensorBoardCallback

    class UnreachableTracker(TensorBoardCallback):  # a tracker whose every log fails, as on a network error
        def __init__(self):
            self.tb_writer = None

        def on_train_begin(self, args, state, control, **kwargs):
            raise ConnectionError("tracker unreachable")

        def on_log(self, args, state, control, logs=None, **kwargs):
            raise ConnectionError("tracker unreachable")

    args = make_args(log_completions=True)
    os.makedirs(args.output_dir)
    Path(args.output_dir, "completions").write_text("a file where the folder should be")  # every write fails
    trainer = tiny_trainer(tokenizer, args, callbacks=[UnreachableTracker()])
    with caplog.at_level(logging.WARNING, logger="grpo_ext.reporting"):
        trainer.train()
    assert trainer.state.global_step == 2  # the run went on, both steps
    files = f"the completions files ({os.path.join(args.output_dir, 'completions')})"
    assert caplog.text.count(f"Logging to {files} failed (FileExistsError: [Errno 17] File exists") == 1
    tracker = "the UnreachableTracker tracker"
    assert caplog.text.count(f"Logging to {tracker} failed (ConnectionError: tracker unreachable)") == 1
    # both steps' files; the tracker's start, two steps and the end-of-training summary
    assert trainer.logging_failures == {files: 2, tracker: 4}


# --- 3. Every user callable is named when it fails ---


class Quiz:
    """An environment whose methods fail on demand."""

    def reset(self, answer, **row):
        self.answer = answer
        return {"bad": "type"} if answer == "dict" else " Go."

    def get_reward(self) -> float:
        return 1.0 / (self.answer != "zero")


def test_environment_methods_are_named_with_the_row_when_they_fail():
    environments = Environments(Quiz)
    prompt = [{"role": "user", "content": "1+1="}]
    rows = [{"answer": "2"}, {"question": "no answer column"}]
    with pytest.raises(EnvironmentCallError) as caught:
        environments.reset(environments.draw(rows), rows, [prompt] * 2)
    assert str(caught.value).startswith(
        "Quiz.reset(**row) raised TypeError: Quiz.reset() missing 1 required positional argument: 'answer' on row 1 "
        "of the batch (prompt \"[{'role': 'user', 'content': '1+1='}]\"); it received the keyword arguments "
        "['question']"
    )
    assert isinstance(caught.value.__cause__, TypeError)

    rows = [{"answer": "dict"}]
    with pytest.raises(EnvironmentCallError, match=r"Quiz.reset\(\*\*row\) returned \{'bad': 'type'\} \(dict\) on "):
        environments.reset(environments.draw(rows), rows, [prompt])

    instances = environments.draw([{"answer": "2"}, {"answer": "zero"}])
    environments.reset(instances, [{"answer": "2"}, {"answer": "zero"}], [prompt] * 2)
    scorer = RewardScorer(None, extra_funcs=environments.reward_funcs)
    with pytest.raises(RewardFunctionError, match=r"'Quiz' raised EnvironmentCallError: Quiz.get_reward\(\) raised "
                       r"ZeroDivisionError: float division by zero on row 1 of the batch"):  # fmt: skip
        scorer.score(["p"] * 2, ["a", "b"], [[1]] * 2, {"environments": instances})

    def broken_factory():
        raise OSError("sandbox image missing")

    with pytest.raises(EnvironmentCallError, match=r"environment_factory \(.*broken_factory\) raised OSError: "):
        Environments(broken_factory)


def test_log_extra_given_a_scalar_names_log_extra_not_a_type_error_of_the_function():
    def scalar_column(completions, log_extra, **kwargs):
        log_extra("score", 3)
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"log_extra\('score', 3\): the values are a int; log a list"):
        RewardScorer(scalar_column).score(["p"] * 2, ["a", "b"], [[1]] * 2, {})


def test_a_failing_rollout_func_is_named(tokenizer, make_args):
    def my_rollout(prompts, trainer):
        raise KeyError("server")

    trainer = tiny_trainer(tokenizer, make_args(), rollout_func=my_rollout)
    with pytest.raises(RuntimeError, match=r"rollout_func 'my_rollout' raised KeyError: 'server' \(on 8 prompts"):
        trainer.generate_and_score([trainer.train_dataset[0]] * 8, mode="train")
    trainer.rollout_func = lambda prompts, trainer: [1, 2]
    with pytest.raises(TypeError, match=r"rollout_func '<lambda>' returned a list; it must return a dict with keys"):
        trainer.generate_and_score([trainer.train_dataset[0]] * 8, mode="train")


# --- 2. Truthful tool accounting ---


def test_a_tool_result_that_does_not_fit_is_dropped_counted_and_warned_about_once(
    tool_tokenizer, make_args, monkeypatch, caplog
):
    def echo(x: int) -> str:
        """Echo.

        Args:
            x: value
        """
        return "a long tool result " * 5

    first = call("echo", x=1) + "<|im_end|>"
    scripted(monkeypatch, tool_tokenizer, [first, "no<|im_end|>"])
    length = len(tool_tokenizer(first)["input_ids"])
    trainer = make_trainer(tool_tokenizer, make_args, tools=[echo], args=dict(max_completion_length=length + 20))
    with caplog.at_level(logging.WARNING, logger="grpo_ext.tools"):
        for _ in range(2):
            rollout = trainer.generate_and_score(rows_of(trainer), mode="train")
    assert rollout.lengths.tolist() == [length] * 4  # the documented rule: the whole round's results are dropped
    metrics = trainer.recorder.values["train"]
    assert metrics["tools/call_frequency"] == [1.0, 1.0]  # the calls ran...
    assert metrics["tools/truncated_frequency"] == [1.0, 1.0]  # ...their results were dropped...
    assert metrics["tools/failure_frequency"] == [1.0, 1.0]  # ...so none succeeded as far as the model knows
    assert metrics["tools/timeout_frequency"] == [0.0, 0.0]
    assert caplog.text.count("The results of 4 tool call(s) did not fit in max_completion_length") == 1


# --- 4. Documented combinations: tools and environments with streams, environments without a dataset ---


class Echo:
    """An environment with one tool and a reward."""

    def reset(self, **row):
        return " Go."

    def shout(self, text: str) -> str:
        """Shout.

        Args:
            text: what to shout
        """
        return text.upper()

    def get_reward(self) -> float:
        return 1.0


def test_tools_and_environments_train_on_a_stream(tool_tokenizer, make_args):
    def noop(x: int) -> int:
        """Nothing.

        Args:
            x: value
        """
        return x

    stream = make_prompt_dataset(4, conversational=True).add_column("environment", ["echo"] * 4).to_iterable_dataset()
    for kwargs in (dict(tools=[noop]), dict(environment_factory={"echo": Echo})):
        trainer = make_trainer(tool_tokenizer, make_args, dataset=stream, args=dict(max_completion_length=20), **kwargs)
        trainer.train()
        assert trainer.state.global_step == 1 and "tools/call_frequency" in trainer.state.log_history[0]
    unknown = make_prompt_dataset(4, conversational=True).add_column("environment", ["echo", "x"] * 2)
    with pytest.raises(ValueError, match=r"train_dataset has rows with environment='x'"):
        make_trainer(
            tool_tokenizer, make_args, dataset=unknown.to_iterable_dataset(), environment_factory={"echo": Echo}
        )
    text = make_prompt_dataset(4).to_iterable_dataset()
    with pytest.raises(
        ValueError, match=r"need conversational prompts, but train_dataset's 'prompt' column holds strs"
    ):
        make_trainer(tool_tokenizer, make_args, dataset=text, tools=[noop])


def test_an_environment_without_a_dataset_must_write_the_prompt(tool_tokenizer, make_args):
    class Silent(Echo):
        def reset(self, **row):
            return None

    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tool_tokenizer), None, processing_class=tool_tokenizer, environment_factory=Silent,
        args=make_args(per_device_train_batch_size=4, num_generations=G, max_completion_length=20, max_steps=1),
    )  # fmt: skip
    with pytest.raises(EnvironmentCallError, match=r"Silent.reset\(\*\*row\) returned None on row 0 .* the prompt is "
                       "still empty: without a train_dataset .* reset must return the prompt's text"):  # fmt: skip
        trainer.train()


# --- 7. Files and command lines ---


def write_gguf(path) -> bytes:
    """A tiny valid GGUF file (one tensor); returns its bytes."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path).read_bytes()


def test_gguf_files_are_checked_and_named_before_transformers_sees_them(tmp_path, tokenizer, make_args, capsys):
    from grpo_ext.models import check_gguf_file
    from grpo_ext.models import main as models_cli

    data = write_gguf(tmp_path / "good.gguf")
    check_gguf_file(str(tmp_path / "good.gguf"), "model")  # a complete file passes
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "pointer.gguf").write_text("version https://git-lfs.github.com/spec/v1\n")
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    (tmp_path / "folder.gguf").mkdir()
    cases = {
        "missing.gguf": (FileNotFoundError, "the GGUF file {} does not exist"),
        "folder.gguf": (ValueError, "{} is not a file"),
        "empty.gguf": (ValueError, "the GGUF file {} is empty"),
        "pointer.gguf": (ValueError, "{} is not a GGUF file: it starts with b'vers', not b'GGUF'"),
        "cut.gguf": (ValueError, f"reading the GGUF file {{}} \\({len(data) - 100} bytes\\) failed"),
    }
    for name, (error, message) in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(error, match="model: " + message.format(re.escape(path))):
            check_gguf_file(path, "model", read_tensor_table=True)
    # The trainer speaks of its argument; the command line of its own
    cut = str(tmp_path / "cut.gguf")
    with pytest.raises(
        ValueError, match=f"model={re.escape(repr(cut))}: reading the GGUF file .* truncated or corrupt"
    ):
        GRPOExtTrainer(cut, lambda completions, **kw: [0.0], args=make_args(), train_dataset=make_prompt_dataset(8))
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match=f"model={re.escape(repr(missing))}: the GGUF file"):
        GRPOExtTrainer(missing, lambda completions, **kw: [0.0], args=make_args(), train_dataset=make_prompt_dataset(8))
    with pytest.raises(SystemExit) as exit_info:
        models_cli([cut, str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert (
        f"error: GGUF_PATH {cut}: reading the GGUF file {cut} ({len(data) - 100} bytes) failed"
        in capsys.readouterr().err
    )


def test_memory_sizes_need_a_unit_and_must_be_positive(make_args, capsys):
    from grpo_ext.plan import GiB, fit_batch_size, parse_memory
    from grpo_ext.plan import main as plan_cli
    from grpo_ext.settings import check_settings

    assert parse_memory("24GB") == parse_memory("24 GiB") == 24 * GiB and parse_memory("1e9B") == 10**9
    with pytest.raises(ValueError, match=r"'24' has no unit: write e.g. '24GiB'"):
        parse_memory("24")
    with pytest.raises(ValueError, match=r"'0GiB' is not a positive memory size"):
        parse_memory("0GiB")
    with pytest.raises(ValueError, match=r"gpu_memory_budget='24': '24' has no unit"):  # the config speaks in fields
        check_settings(make_args(gpu_memory_budget="24"))
    for flag, message in (("0", "'0' has no unit"), ("0GB", "'0GB' is not a positive memory size")):
        with pytest.raises(SystemExit) as exit_info:  # the command line in flags
            plan_cli(["--config", str(RECIPE_CONFIG), "--gpu-memory", flag])
        assert exit_info.value.code == 2 and f"error: --gpu-memory {flag}: {message}" in capsys.readouterr().err
    # An architecture the planner cannot model: the trainer's user is told about fields, not --model-config
    with pytest.raises(ValueError) as caught:
        fit_batch_size(make_args(gpu_memory_budget="8GiB"), {"model_type": "my_arch", "hidden_size": 64})
    message = str(caught.value)
    assert message.startswith("gpu_memory_budget='8GiB': the model's config (my_arch architecture) has no ")
    assert "unset gpu_memory_budget and set per_device_train_batch_size" in message and "--" not in message
    # ... and so is the user of a recurrent model, which the planner refuses by its model_type
    with pytest.raises(ValueError) as caught:
        fit_batch_size(make_args(gpu_memory_budget="8GiB"), {"model_type": "mamba", "hidden_size": 64})
    message = str(caught.value)
    assert message.startswith("gpu_memory_budget='8GiB'") and "cannot plan model_type 'mamba'" in message
    assert "unset gpu_memory_budget and set per_device_train_batch_size" in message and "--" not in message


# --- 6. Streams: a bad row anywhere is named ---


def _error(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        function(*args, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize(
    "bad_row",
    [
        {"prompt": " ", "answer": "1"},  # empty
        {"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"},  # a chat prompt after text rows, unknown role
        {"prompt": 7, "answer": "1"},  # not a prompt at all
        {"prompt": "1+1=", "solution": "2"},  # the column the reward function takes is missing
    ],
    ids=["empty", "role", "type", "column"],
)
def test_a_bad_row_deep_in_a_stream_is_named_as_the_start_check_names_it(tokenizer, make_args, bad_row):
    from datasets import Dataset, IterableDataset

    from grpo_ext.data import check_dataset, checked_stream

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    rows.insert(3, bad_row)
    needed = {"reward": ["answer"]}
    stream = IterableDataset.from_generator(lambda: iter(rows))
    late = _error(list, checked_stream(stream, "train_dataset", make_args(), needed, tokenizer, 64, checked_at_start=2))
    early = _error(check_dataset, IterableDataset.from_generator(lambda: iter(rows)), "train_dataset", make_args(),
                   needed, tokenizer, 64)  # fmt: skip
    assert late == early and ("train_dataset row 3: the prompt" in late or "train_dataset row 3 has no" in late)
    if bad_row["prompt"] == " ":  # a map-style set says the same as well
        assert late == _error(check_dataset, Dataset.from_list(rows), "train_dataset", make_args(), needed)


def test_the_trainer_checks_a_stream_past_its_first_rows(tokenizer, make_args):
    from datasets import Dataset

    prompts = [f"{i % 10}+1=" for i in range(1004)]
    prompts[1002] = ""
    stream = Dataset.from_dict({"prompt": prompts}).to_iterable_dataset()
    trainer = tiny_trainer(tokenizer, make_args(shuffle_dataset=False), dataset=stream)  # the first 1000 pass
    with pytest.raises(ValueError, match=r"^train_dataset row 1002: the prompt is unusable: it is empty"):
        for _ in trainer.get_train_dataloader():
            pass


# --- 8. Leftovers: clear errors or documented fallbacks, before step 1 ---


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


def test_an_output_dir_that_cannot_be_written_is_refused_at_init(tokenizer, make_args, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"output_dir={re.escape(repr(str(taken)))} is a file, not a folder"):
        tiny_trainer(tokenizer, make_args(output_dir=str(taken)))
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission case needs another user")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match=r"cannot be written .* would be lost at the first save"):
        tiny_trainer(tokenizer, make_args(output_dir=str(locked / "run")))


def test_resuming_corrupt_finished_or_other_kind_checkpoints(tokenizer, make_args, caplog):
    from peft import LoraConfig

    args = lambda **kw: make_args(save_strategy="steps", save_steps=1, **kw)  # noqa: E731
    tiny_trainer(tokenizer, args()).train()  # checkpoint-1, checkpoint-2 of a full-model run
    out = Path(args().output_dir)

    calls = []
    counted = lambda completions, **kw: calls.append(1) or [0.0] * len(completions)  # noqa: E731
    finished = tiny_trainer(tokenizer, args(), counted)
    with caplog.at_level(logging.WARNING, logger="grpo_ext.checkpoints"):
        output = finished.train(resume_from_checkpoint=True)
    assert output.global_step == finished.state.global_step == 2 and calls == []  # no third step
    assert "checkpoint-2 is at step 2 and max_steps=2: the run is finished, so nothing is trained" in caplog.text

    lora = tiny_trainer(tokenizer, args(), peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"checkpoint-2: it holds a full model's weights .* trains a PEFT adapter"):
        lora.train(resume_from_checkpoint=True)

    (out / "checkpoint-2" / "grpo_ext_state.json").write_text('{"run": {"num_gen')  # cut off
    with pytest.raises(ValueError) as caught:
        tiny_trainer(tokenizer, args()).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert str(caught.value).startswith(
        f"Cannot resume from {out / 'checkpoint-2'}: grpo_ext_state.json is unreadable (JSONDecodeError"
    )
    assert f"The newest complete one there is {out / 'checkpoint-1'}." in str(caught.value)
    with pytest.warns(UserWarning, match=r"Skipping .*checkpoint-2 on resume: .*grpo_ext_state.json is unreadable"):
        resumed = tiny_trainer(tokenizer, args(), counted)
        resumed.train(resume_from_checkpoint=True)  # falls back to checkpoint-1 and trains step 2
    assert resumed.state.global_step == 2 and calls == [1]


def test_generation_kwargs_that_break_the_group(make_args):
    with pytest.warns(
        UserWarning, match=r"greedy decoding gives the num_generations completions .* nothing is learned"
    ):
        make_args(generation_kwargs={"do_sample": False})
    with pytest.raises(ValueError, match=r"num_return_sequences is set by the trainer, .* set num_generations instead"):
        make_args(generation_kwargs={"num_return_sequences": 4})
    with pytest.raises(ValueError, match=r"samples at another temperature than temperature=1.0, which scoring divides"):
        make_args(generation_kwargs={"temperature": 0.7})


def test_a_model_and_tokenizer_without_any_eos_are_refused(make_args):
    tokenizer = make_tokenizer()
    model = make_tiny_model("qwen2", tokenizer)
    tokenizer.eos_token = None
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match=r"Neither the tokenizer \(processing_class\) has an eos_token nor the model"):
        GRPOExtTrainer(model, constant_reward, args=make_args(), train_dataset=make_prompt_dataset(8),
                       processing_class=tokenizer)  # fmt: skip


def test_reward_model_strings_that_are_not_models_are_named(tmp_path):
    with pytest.raises(
        ValueError, match=r"reward_funcs\[1\]='accuracy' is a reward function's name, .* get_reward_funcs"
    ):
        RewardScorer([constant_reward, "accuracy"])
    with pytest.raises(ValueError, match=r"reward_funcs\[0\]='reward_models.accuracy.accuracy_reward' is a reward"):
        RewardScorer(["reward_models.accuracy.accuracy_reward"])
    missing = str(tmp_path / "rm")
    with pytest.raises(
        FileNotFoundError, match=f"reward_funcs\\[0\\]={re.escape(repr(missing))}: no such reward model"
    ):
        RewardScorer([missing])


def test_a_list_of_rows_is_a_dataset(tokenizer, make_args):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    trainer = tiny_trainer(tokenizer, make_args(max_steps=1), dataset=rows)
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.train_dataset.column_names == ["prompt", "answer"]
    with pytest.raises(TypeError, match=r"train_dataset is a list whose row 1 is '2\+1=' \(str\); a list dataset"):
        tiny_trainer(tokenizer, make_args(), dataset=[{"prompt": "1+1="}, "2+1="])


@pytest.mark.slow  # the recipe end to end
def test_the_recipe_stopped_by_sigterm_saves_then_exits_143(tmp_path):
    """A scheduler that requeues pre-empted jobs reads the exit status: 143 (128 + SIGTERM), never 0, after the
    checkpoint is saved."""
    import json
    import signal
    import subprocess
    import sys

    import yaml

    from grpo_ext.testing import make_arithmetic_splits, save_tiny_model

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_arithmetic_splits(num_test=10)[0].select(range(8))))
    config = {
        "model_name_or_path": save_tiny_model(tmp_path / "base"), "dtype": "float32", "dataset_name": str(data),
        "dataset_config": None, "dataset_test_split": None, "instruction": "", "conversational": False,
        "reward_funcs": ["accuracy"], "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8,
        "num_generations": 4, "max_completion_length": 4, "max_steps": 100000, "save_strategy": "steps",
        "save_steps": 1, "logging_steps": 1, "bf16": False, "gradient_checkpointing": False, "use_cpu": True,
        "report_to": "none", "disable_tqdm": True, "beta": 0.0,
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    process = subprocess.Popen(
        [sys.executable, str(root / "recipes" / "deepseek_math_style.py"), "--config", str(tmp_path / "config.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
    )  # fmt: skip
    first = tmp_path / "out" / "checkpoint-1" / "trainer_state.json"
    while not first.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert "Interrupted: resume with --resume_from_checkpoint true" in out
    saved = sorted((tmp_path / "out").glob("checkpoint-*/trainer_state.json"))
    assert len(saved) >= 2  # the one it was interrupted at, saved before exiting
