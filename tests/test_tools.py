"""tools.py and the trainer's tool calling: tools called with the parsed arguments, their results in the completion but
out of the loss, iteration limit, failures, async tools, rollback past max_completion_length, environments, errors.

A random tiny model never writes a tool call, so generation is scripted: `grpo_ext.engine.generate_completions` is
replaced by a function that answers each history with the text of its turn (the number of assistant turns so far).
"""

import json
import logging

import pytest
import torch
from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving, qwen3_chat_template

import grpo_ext.engine as engine_module
from grpo_ext import GRPOExtTrainer
from grpo_ext.rollout import micro_batches, pad_token_lists
from grpo_ext.testing import TOOL_RESPONSE_TEMPLATE, make_prompt_dataset, make_tiny_model, make_tokenizer
from grpo_ext.tools import parse_completion, run_tool_calls, tool_suffix_ids

G = 2


def call(name, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def scripted(monkeypatch, tokenizer, turns: list[str]):
    """Generation answers a history holding k assistant turns already with `turns[k]` (the last one repeated)."""

    def generate(model, prompt_ids, prompt_mask, num_generations, generation_config, plan, *drafting, **vision):
        rows = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            done = tokenizer.decode(ids[mask.bool()]).count("<|im_start|>assistant") - 1
            text = turns[min(done, len(turns) - 1)]
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"][: generation_config.max_new_tokens])
        return pad_token_lists(rows, tokenizer.pad_token_id, "right", prompt_ids.device)[0]  # (B, C)

    monkeypatch.setattr(engine_module, "generate_completions", generate)


@pytest.fixture
def tool_tokenizer():
    return make_tokenizer(tool_calling=True)


def make_trainer(tokenizer, make_args, reward_funcs=None, dataset=None, model=None, **kwargs):
    settings = dict(per_device_train_batch_size=4, num_generations=G, max_completion_length=120, max_steps=1)
    settings.update(kwargs.pop("args", {}))
    return GRPOExtTrainer(
        model if model is not None else make_tiny_model("qwen2", tokenizer),
        reward_funcs if reward_funcs is not None else (lambda completions, **kw: [0.0] * len(completions)),
        args=make_args(**settings),
        train_dataset=dataset if dataset is not None else make_prompt_dataset(4, conversational=True),
        processing_class=tokenizer,
        **kwargs,
    )


def rows_of(trainer, prompts: int = 2) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(prompts) for _ in range(G)]


def text(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


# --- The pieces ---


def test_parse_and_run_tool_calls(tool_tokenizer):
    def add(a: int, b: int) -> int:
        """Add.

        Args:
            a: first
            b: second
        """
        return a + b

    async def later(x: int) -> int:
        """Later.

        Args:
            x: value
        """
        return x * 10

    ids = tool_tokenizer(call("add", a=3, b=4) + call("later", x=2) + "<|im_end|>", add_special_tokens=False)
    message = parse_completion(tool_tokenizer, ids["input_ids"], [], [add, later])
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "add", "arguments": {"a": 3, "b": 4}},
        {"name": "later", "arguments": {"x": 2}},
    ]
    malformed = tool_tokenizer('<tool_call>{"name": "add", "argu</tool_call><|im_end|>', add_special_tokens=False)
    assert "tool_calls" not in parse_completion(tool_tokenizer, malformed["input_ids"], [], [add])  # plain text
    results, failures, timeouts = run_tool_calls(
        message["tool_calls"] + [{"type": "function", "function": {"name": "x"}}], [add, later]
    )
    assert results == [("add", 7), ("later", 20), ("x", {"error": "Tool x not found."})] and failures == 1
    assert timeouts == 0
    suffix = tool_suffix_ids(tool_tokenizer, [{"role": "tool", "name": "add", "content": "7"}])
    assert text(tool_tokenizer, suffix) == "\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n"


# --- The trainer's rollout ---


def test_tool_results_are_in_the_completion_but_not_in_the_loss(tool_tokenizer, make_args, monkeypatch):
    calls = []

    def multiply(a: int, b: int) -> int:
        """Multiply two numbers.

        Args:
            a: first factor
            b: second factor
        """
        calls.append((a, b))
        return a * b

    first, last = call("multiply", a=3, b=4) + "<|im_end|>", "12<|im_end|>"
    scripted(monkeypatch, tool_tokenizer, [first, last])
    trainer = make_trainer(tool_tokenizer, make_args, tools=[multiply], args=dict(loss_type="dapo"))
    rollout = trainer.generate_and_score(rows_of(trainer), mode="train")

    assert calls == [(3, 4)] * 4  # every row called the tool with the parsed arguments
    suffix = "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"
    for ids, tool_mask, length in zip(rollout.completion_ids, rollout.tool_mask, rollout.lengths):
        assert text(tool_tokenizer, ids[:length]) == first + suffix + last  # the tool result's tokens are in it
        assert text(tool_tokenizer, ids[:length][tool_mask[:length] == 0]) == suffix  # and only they are masked
    n_first, n_last = len(tool_tokenizer(first)["input_ids"]), len(tool_tokenizer(last)["input_ids"])
    assert rollout.generated_lengths.tolist() == [n_first + n_last] * 4
    assert not rollout.is_truncated.any() and rollout.shared_prefix  # scored with each prompt encoded once
    metrics = trainer.recorder.values["train"]
    assert metrics["tools/call_frequency"] == [1.0] and metrics["tools/failure_frequency"] == [0.0]
    assert metrics["completions/mean_length"] == [float(n_first + n_last)]  # model tokens only

    # The loss and its gradient are those of the generated tokens only
    (batch,) = micro_batches(rollout, 1, 1, trainer.args.max_completion_length, trainer.accelerator)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
    model = trainer.model
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def by_hand(mask):
        model.zero_grad()
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        attention = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, batch.prompt_ids.size(1) - 1 : -1]
        logps = logits.log_softmax(-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, C)
        ratio = torch.exp(logps - logps.detach())
        loss = -(ratio * batch.advantages[:, None] * mask).sum() / mask.sum()  # dapo, on-policy, beta = 0
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for grad, expected in zip(grads, by_hand(batch.completion_mask * batch.tool_mask)):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    with_tool_tokens = by_hand(batch.completion_mask)
    assert any(not torch.allclose(g, e, atol=1e-5, rtol=1e-4) for g, e in zip(grads, with_tool_tokens))


def test_later_turns_continue_the_whole_history(tool_tokenizer, make_args, monkeypatch):
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: first
            b: second
        """
        return a + b

    first = call("add", a=1, b=2) + "<|im_end|>"
    generate = engine_module.generate_completions

    def first_turn_scripted(
        model, prompt_ids, prompt_mask, num_generations, generation_config, plan, *drafting, **vision
    ):
        if num_generations == 1:  # a later turn: the model itself, from prompt + completion + tool result
            return generate(
                model, prompt_ids, prompt_mask, num_generations, generation_config, plan, *drafting, **vision
            )
        ids = tool_tokenizer(first, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids] * prompt_ids.size(0))

    monkeypatch.setattr(engine_module, "generate_completions", first_turn_scripted)
    trainer = make_trainer(
        tool_tokenizer,
        make_args,
        tools=[add],
        args=dict(max_completion_length=120, generation_kwargs={"do_sample": False}),
    )
    rollout = trainer.generate_and_score(rows_of(trainer), mode="train")

    before = len(tool_tokenizer(first + "\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    histories = torch.cat([rollout.prompt_ids, rollout.completion_ids[:, :before]], 1)  # equal lengths: no padding
    expected = trainer.model.generate(
        input_ids=histories, attention_mask=torch.ones_like(histories), generation_config=trainer.generation_config,
        max_new_tokens=120 - before,
    )[:, histories.size(1) :]  # fmt: skip
    for row, ids in enumerate(expected.tolist()):
        ends = [i for i, token in enumerate(ids) if token in trainer.eos_token_ids]
        ids = ids[: ends[0] + 1] if ends else ids
        assert rollout.completion_ids[row, before : rollout.lengths[row]].tolist() == ids
        assert rollout.tool_mask[row].sum() == len(tool_tokenizer(first)["input_ids"]) + len(ids)
    assert rollout.lengths.max() <= 120


def test_iteration_limit_failures_and_async_tools(tool_tokenizer, make_args, monkeypatch):
    calls = []

    def broken(x: int) -> int:
        """Always fails.

        Args:
            x: anything
        """
        raise RuntimeError("boom")

    async def double(x: int) -> int:
        """Double a number.

        Args:
            x: the number
        """
        calls.append(x)
        return 2 * x

    seen = []

    def record(completions, **kwargs):
        seen.extend(completions)
        return [0.0] * len(completions)

    turn = call("double", x=5) + call("broken", x=1) + call("nope") + "<|im_end|>"
    scripted(monkeypatch, tool_tokenizer, [turn])  # every turn calls the tools again
    trainer = make_trainer(
        tool_tokenizer, make_args, reward_funcs=record, tools=[broken, double],
        args=dict(max_tool_calling_iterations=1, max_completion_length=460),
    )  # fmt: skip
    rollout = trainer.generate_and_score(rows_of(trainer), mode="train")

    assert calls == [5] * 4  # one round; the second turn's calls are not run
    messages = seen[0]
    assert [m["role"] for m in messages] == ["assistant", "tool", "tool", "tool", "assistant"]
    assert [m["content"] for m in messages[1:4]] == ["10", "{'error': 'boom'}", "{'error': 'Tool nope not found.'}"]
    assert messages[-1]["tool_calls"]  # the limit stopped it, not the model
    metrics = trainer.recorder.values["train"]
    assert metrics["tools/call_frequency"] == [3.0]
    assert metrics["tools/failure_frequency"] == [pytest.approx(2 / 3)]
    assert rollout.tool_mask.sum(1).tolist() == [2 * len(tool_tokenizer(turn)["input_ids"])] * 4

    scripted(monkeypatch, tool_tokenizer, [call("double", x=1) + "<|im_end|>"])
    trainer = make_trainer(
        tool_tokenizer, make_args, reward_funcs=record, tools=[broken, double],
        args=dict(max_tool_calling_iterations=3, max_completion_length=460),
    )  # fmt: skip
    trainer.generate_and_score(rows_of(trainer), mode="train")
    assert calls[4:] == [1] * 12  # three rounds of 4 rows


def test_tool_results_past_max_completion_length_are_rolled_back(tool_tokenizer, make_args, monkeypatch):
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
    seen = []
    trainer.rewards.funcs[0] = lambda completions, **kw: seen.extend(completions) or [0.0] * len(completions)
    rollout = trainer.generate_and_score(rows_of(trainer), mode="train")
    assert rollout.lengths.tolist() == [length] * 4 and rollout.tool_mask.sum(1).tolist() == [length] * 4
    assert all([m["role"] for m in messages] == ["assistant"] for messages in seen)
    assert trainer.recorder.values["train"]["tools/call_frequency"] == [1.0]  # it ran, its result did not fit


def qwen3_tokenizer():
    """The tool tokenizer with Qwen3's chat template (TRL's copy, so TRL knows its training version), which drops an
    assistant turn's empty reasoning block once a tool result follows it: not prefix-preserving."""
    tokenizer = make_tokenizer(tool_calling=True)
    tokenizer.chat_template = qwen3_chat_template
    tokenizer.response_template = None  # TRL sets Qwen3's
    return tokenizer


def multiply(a: int, b: int) -> int:
    """Multiply.

    Args:
        a: first
        b: second
    """
    return a * b


def test_a_template_that_is_not_prefix_preserving_is_swapped_for_trls_training_template(make_args, monkeypatch, caplog):
    tokenizer = qwen3_tokenizer()
    assert not is_chat_template_prefix_preserving(tokenizer)
    training_template = get_training_chat_template(tokenizer)
    qwen3_call = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    first, last = "<think>\n\n</think>\n\n" + qwen3_call + "<|im_end|>", "<think>\ny\n</think>\n\n12<|im_end|>"
    scripted(monkeypatch, tokenizer, [first, last])
    with caplog.at_level(logging.INFO, logger="grpo_ext.tools"):
        trainer = make_trainer(
            tokenizer,
            make_args,
            reward_funcs=lambda completions, **kw: [float(i) for i in range(len(completions))],
            tools=[multiply],
            model=make_tiny_model("qwen2", tokenizer, max_position_embeddings=2048),  # Qwen3's tool prompt is long
            args=dict(max_completion_length=200),
        )
    assert "get_training_chat_template" in caplog.text  # the swap is said
    assert tokenizer.chat_template == qwen3_chat_template  # the tokenizer's own template is left as is
    rollout = trainer.generate_and_score(rows_of(trainer), mode="train")

    # Qwen3's own template gives no tool-result tokens to append
    with pytest.raises(ValueError, match="renders an assistant turn differently"):
        tool_suffix_ids(tokenizer, [{"role": "tool", "name": "multiply", "content": "12"}])
    # The prompt, and the history the second turn continues, are what the training template renders
    prompt = trainer.train_dataset[0]["prompt"]
    turn = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [
        {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]}  # fmt: skip
    history = prompt + [turn, {"role": "tool", "name": "multiply", "content": "12"}]
    render = dict(tools=[multiply], add_generation_prompt=True, tokenize=False)
    expected = tokenizer.apply_chat_template(history, chat_template=training_template, **render)
    suffix = "\n<|im_start|>user\n<tool_response>\n12\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    prompt_length, before = int(rollout.prompt_mask[0].sum()), len(tokenizer(first + suffix)["input_ids"])
    ids = rollout.prompt_ids[0, -prompt_length:].tolist() + rollout.completion_ids[0, :before].tolist()
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert text(tokenizer, ids) != tokenizer.apply_chat_template(history, **render)  # Qwen3's own drops "<think>..."
    for ids, tool_mask, length in zip(rollout.completion_ids, rollout.tool_mask, rollout.lengths):
        assert text(tokenizer, ids[:length]) == first + suffix + last
        assert text(tokenizer, ids[:length][tool_mask[:length] == 0]) == suffix
    assert trainer.recorder.values["train"]["tools/call_frequency"] == [1.0]

    # And it trains
    before_step = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before_step, trainer.model.parameters()))


def test_a_template_that_is_not_prefix_preserving_and_unknown_to_trl_is_refused(make_args):
    tokenizer = qwen3_tokenizer()
    tokenizer.chat_template = qwen3_chat_template + "{# a local edit #}"  # no longer the template TRL knows
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    with pytest.raises(ValueError, match="not prefix-preserving.*get_training_chat_template has no"):
        make_trainer(tokenizer, make_args, tools=[multiply])


class Counter:
    """An environment: a counter the model increments; the reward is the final count."""

    def __init__(self):
        self.total, self.answers = 0, []

    def reset(self, answer, **row):
        self.total = 0
        self.answers.append(answer)
        return " Count."

    def increment(self, step: int) -> int:
        """Add to the counter.

        Args:
            step: how much to add
        """
        self.total += step
        return self.total

    def get_reward(self) -> float:
        return float(self.total)


def test_environment_rollout(tool_tokenizer, make_args, monkeypatch):
    scripted(monkeypatch, tool_tokenizer, [call("increment", step=2) + "<|im_end|>", "done<|im_end|>"])
    received = {}

    def record(prompts, completions, environments, **kwargs):
        received.update(prompts=prompts, environments=environments)
        return [None] * len(prompts)

    built = []  # every instance environment_factory made: the trainer's pool (its first, the probe, included)
    init = Counter.__init__
    monkeypatch.setattr(Counter, "__init__", lambda self: built.append(self) or init(self))
    trainer = make_trainer(tool_tokenizer, make_args, reward_funcs=record, environment_factory=Counter)
    assert trainer.rewards.names == ["record", "Counter"]
    rows = rows_of(trainer)
    rollout = trainer.generate_and_score(rows, mode="train")
    environments = received["environments"]
    assert len({id(env) for env in environments}) == 4 and all(type(env) is Counter for env in environments)
    assert [env.total for env in environments] == [2] * 4  # the method ran as a tool on its own instance
    assert [env.answers for env in environments] == [[row["answer"]] for row in rows]  # reset(**row)
    assert all(
        p[-1]["content"] == row["prompt"][-1]["content"] + " Count." for p, row in zip(received["prompts"], rows)
    )
    assert "Count.<|im_end|>" in text(tool_tokenizer, rollout.prompt_ids[0])  # the observation was generated from
    assert "Tools: increment" in text(tool_tokenizer, rollout.prompt_ids[0])  # the method's schema in the prompt
    assert trainer.recorder.values["train"]["rewards/Counter/mean"] == [2.0]

    trainer.generate_and_score(rows, mode="train")  # instances are reused, not rebuilt
    assert built == environments
    assert [env.answers for env in environments] == [[row["answer"]] * 2 for row in rows]


def test_environments_by_name_and_without_reward_funcs_or_dataset(tool_tokenizer, make_args, monkeypatch):
    class Doubler(Counter):
        def increment(self, step: int) -> int:
            """Add twice.

            Args:
                step: how much to add, twice
            """
            self.total += 2 * step
            return self.total

    scripted(monkeypatch, tool_tokenizer, [call("increment", step=1) + "<|im_end|>", "done<|im_end|>"])
    dataset = make_prompt_dataset(4, conversational=True).add_column("environment", ["single", "double"] * 2)
    trainer = make_trainer(
        tool_tokenizer, make_args, reward_funcs=[], dataset=dataset,
        environment_factory={"single": Counter, "double": Doubler},
    )  # fmt: skip
    assert trainer.rewards.names == ["Counter", "Doubler"]
    trainer.generate_and_score(rows_of(trainer, prompts=4)[::2], mode="train")  # one row of each prompt
    rewards = trainer.recorder.values["train"]
    assert rewards["rewards/Counter/mean"] == [1.0] and rewards["rewards/Doubler/mean"] == [2.0]

    class Game(Counter):
        def reset(self, **row):
            self.total = 0
            return "Start at 0."

    no_data = GRPOExtTrainer(
        make_tiny_model("qwen2", tool_tokenizer), None,
        args=make_args(per_device_train_batch_size=4, num_generations=G, max_completion_length=120, max_steps=1),
        processing_class=tool_tokenizer, environment_factory=Game,
    )  # fmt: skip
    rollout = no_data.generate_and_score(rows_of(no_data), mode="train")
    assert "user\nStart at 0.<|im_end|>" in text(tool_tokenizer, rollout.prompt_ids[0])
    assert no_data.recorder.values["train"]["rewards/Game/mean"] == [1.0]


def test_a_subclass_overriding_generate_drives_the_rollout(tool_tokenizer, make_args):
    class Fixed(GRPOExtTrainer):
        def _generate(self, prompts):
            prompt_ids = [[5, 6, 7]] * len(prompts)
            completion_ids = [[8, 9, self.processing_class.eos_token_id]] * len(prompts)
            completions = [[{"role": "assistant", "content": "fixed"}]] * len(prompts)
            return prompt_ids, completion_ids, None, completions, None, {}, None, []

    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tool_tokenizer), lambda completions, **kw: [0.0] * len(completions),
        args=make_args(per_device_train_batch_size=4, num_generations=G), processing_class=tool_tokenizer,
        train_dataset=make_prompt_dataset(4, conversational=True),
    )  # fmt: skip
    trainer.__class__ = Fixed
    rollout = trainer.generate_and_score(rows_of(trainer), mode="train")
    assert rollout.completion_ids.tolist() == [[8, 9, tool_tokenizer.eos_token_id]] * 4
    assert rollout.prompt_ids.tolist() == [[5, 6, 7]] * 4 and rollout.tool_mask is None


def test_constructor_errors(tool_tokenizer, tokenizer, make_args):
    def noop(x: int) -> int:
        """Nothing.

        Args:
            x: value
        """
        return x

    class NoReset:
        def act(self, x: int) -> int:
            """Act.

            Args:
                x: value
            """
            return x

    with pytest.raises(ValueError, match="no reward source"):
        make_trainer(tool_tokenizer, make_args, reward_funcs=[], tools=[noop])
    with pytest.raises(ValueError, match="'environment' column"):
        make_trainer(tool_tokenizer, make_args, environment_factory={"a": Counter})
    dataset = make_prompt_dataset(4, conversational=True).add_column("environment", ["a", "b"] * 2)
    with pytest.raises(ValueError, match="environment='b'"):
        make_trainer(tool_tokenizer, make_args, dataset=dataset, environment_factory={"a": Counter})
    with pytest.raises(ValueError, match="without a `reset` method"):
        make_trainer(tool_tokenizer, make_args, environment_factory=NoReset)
    with pytest.raises(ValueError, match="requires a `train_dataset`"):
        GRPOExtTrainer(
            make_tiny_model("qwen2", tool_tokenizer), noop, args=make_args(), processing_class=tool_tokenizer,
            environment_factory={"a": Counter},
        )  # fmt: skip
    with pytest.raises(ValueError, match="does not render a tool-calling conversation"):
        make_trainer(tokenizer, make_args, tools=[noop])  # the plain template ignores tool calls
    with pytest.raises(ValueError, match="conversational prompts"):
        make_trainer(tool_tokenizer, make_args, tools=[noop], dataset=make_prompt_dataset(4))
    no_parser = make_tokenizer(tool_calling=True)
    no_parser.response_template = None
    with pytest.raises(ValueError, match="no `response_template`"):
        make_trainer(no_parser, make_args, tools=[noop])
    with pytest.raises(TypeError, match="tools\\[0\\]"):
        make_trainer(tool_tokenizer, make_args, tools=["noop"])


def test_rollout_func_replaces_generation_and_feeds_the_rewards(tokenizer, make_args):
    """TRL's rollout_func: its completions are the rollout's, env_mask keeps tokens out of the loss, other keys reach
    the reward functions (one value per row), a missing key is an error naming it."""
    seen = {}

    def rollout_func(prompts, trainer):
        seen["prompts"] = list(prompts)
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completion_ids = [tokenizer("12", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]] * len(
            prompts
        )
        env_mask = [[1, 0, 1]] * len(prompts)  # the "2" came from the environment
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "env_mask": env_mask,
                "judge": [float(i) for i in range(len(prompts))]}  # fmt: skip

    def reward(completions, judge, **kwargs):
        seen["completions"], seen["judge"] = list(completions), list(judge)
        return judge

    trainer = GRPOExtTrainer(make_tiny_model("qwen2", tokenizer), reward, args=make_args(max_steps=1),
                             train_dataset=make_prompt_dataset(8), processing_class=tokenizer, rollout_func=rollout_func)  # fmt: skip
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(4)]
    rollout = trainer.generate_and_score(rows, "train")
    assert seen["prompts"] == [row["prompt"] for row in rows]
    assert seen["completions"] == ["12"] * 8 and seen["judge"] == [float(i) for i in range(8)]
    assert rollout.completion_mask[:, :3].tolist() == [[1, 1, 1]] * 8
    assert rollout.loss_mask[:, :3].tolist() == [[1, 0, 1]] * 8
    assert torch.allclose(rollout.advantages[:4], torch.tensor([-1.1619, -0.3873, 0.3873, 1.1619]), atol=1e-4)

    trainer.rollout_func = lambda prompts, trainer: {"prompt_ids": [], "completion_ids": []}
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        trainer.generate_and_score(rows, "train")
