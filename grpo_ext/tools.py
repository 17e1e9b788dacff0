"""Tool calling and environments: completions that call Python functions, and the model going on after the results.

As `trl.GRPOTrainer` (`tools=`, `environment_factory=`, `max_tool_calling_iterations`):

1. Prompts are rendered with each row's tool schema (`apply_chat_template(tools=...)`, built by transformers from the
   functions' signatures and docstrings).
2. A completion is parsed with the tokenizer's `response_template` (`tokenizer.parse_response`); a malformed one is
   plain text. Each tool call of a completion's last turn is run (sync, or async awaited concurrently); a tool that
   raises or times out, an unknown name or an unsupported call type gives an `{"error": ...}` result and counts as a
   failure.
3. The results, as `{"role": "tool", "name": ..., "content": str(result)}` messages, are appended to the completion
   as the tokens the chat template renders for them (`tool_suffix_ids`: the difference between a dummy conversation
   with and without them), and the model generates its next turn after them, one completion per row (each row has
   its own history). Up to `max_tool_calling_iterations` rounds; results that would push a completion past
   `max_completion_length` (or the model's context) are rolled back and that row stops (as TRL does): those calls
   count as failed (`tools/failure_frequency`) and dropped (`tools/truncated_frequency`), with one warning.
   A tool still running after `tool_timeout` seconds gives an error result (`tools/timeout_frequency`).
4. The completion's ids hold every turn and every tool result; `tool_mask` is 0 on the tool-result tokens, which the
   model did not generate: they are context for the later turns, never scored as actions (loss, log-prob ratios,
   KL terms, token-mean metrics and lengths count the model's tokens only).

Steps 1 and 3 need a prefix-preserving chat template (earlier turns rendered the same whatever follows). One that is
not (Qwen3's drops an earlier turn's empty reasoning block) is replaced there, as TRL does, by TRL's training version of it
(`training_chat_template`); a template TRL has no version of is refused.

Environments (`Environments`): `environment_factory` is a callable returning an instance, or a dict name -> callable
(each row's `environment` column then picks one). Each rollout gets its own instance from a pool that grows to the
largest number a batch needed; `reset(**row)` starts its episode, and a returned string is appended to the last user
message. The instance's public methods but `reset` and `get_reward` are that row's tools; `get_reward()` makes the
environment a reward source (weight 1, named after its class). Reward functions receive the instances as
`environments`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset, IterableDataset

from .concurrency import UserCodeTimeout, await_all, call_with_deadline
from .data import first_rows
from .rollout import is_conversational, pad_token_lists, token_lists_until_stop

logger = logging.getLogger(__name__)

ENVIRONMENT_COLUMN = "environment"
# Methods of an environment that are not tools
_ENVIRONMENT_PROTOCOL = ("reset", "get_reward")
# The prompt of a row when the environment's reset() writes it (training without a dataset)
EMPTY_PROMPT = [{"role": "user", "content": ""}]

__all__ = [
    "ENVIRONMENT_COLUMN",
    "EMPTY_PROMPT",
    "EnvironmentCallError",
    "Environments",
    "MultiTurn",
    "ToolCalling",
    "Episode",
    "check_tool_support",
    "training_chat_template",
    "placeholder_dataset",
    "environment_tools",
    "parse_completion",
    "run_tool_calls",
    "tool_call_loop",
    "tool_suffix_ids",
]


# --- Set-up checks ---


def check_tool_support(tokenizer, tools: list) -> None:
    """The chat template must render a tool-calling conversation, and the tokenizer must parse tool calls out of a
    completion. (A template that is not prefix-preserving is `training_chat_template`'s concern.)"""
    from trl.chat_template_utils import add_response_schema, supports_tool_calling

    for index, tool in enumerate(tools):
        if not callable(tool):
            raise TypeError(
                f"tools[{index}] is a {type(tool).__name__}; tools must be Python functions (sync or async)."
            )
    if not supports_tool_calling(tokenizer):
        raise ValueError(
            "tools / environment_factory: the processing_class's chat template does not render a tool-calling "
            "conversation (user -> assistant with tool_calls -> tool). Use a model whose template supports tools, or "
            "set tokenizer.chat_template to one that does."
        )
    if getattr(tokenizer, "response_template", None) is None:
        try:  # TRL knows the response templates of common chat templates (Qwen, Llama, GLM, ...)
            add_response_schema(tokenizer)
        except ValueError as error:
            raise ValueError(
                "tools / environment_factory: the processing_class has no `response_template`, so tool calls cannot "
                "be parsed from completions, and TRL does not know this chat template. Set "
                "tokenizer.response_template (transformers' response-parsing docs)."
            ) from error


def training_chat_template(tokenizer) -> str | None:
    """The chat template that renders the prompts and the tool results of a multi-turn rollout: None (the tokenizer's
    own) when that one is prefix-preserving, else TRL's training version of it.

    A multi-turn completion is built by appending the tokens of each tool result (`tool_suffix_ids`), so the template
    must render earlier turns the same whatever follows them. Some do not: Qwen3's drops an assistant turn's empty
    reasoning block once a tool result follows it. As `trl.GRPOTrainer`, such a template is swapped for
    `trl.chat_template_utils.get_training_chat_template`'s prefix-preserving version, passed as `chat_template=` to
    `apply_chat_template` (the tokenizer's own template is left as is); one TRL has no version of is refused."""
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    if is_chat_template_prefix_preserving(tokenizer):
        return None
    try:
        template = get_training_chat_template(tokenizer)
    except ValueError:  # a template TRL has no training version of
        template = None
    if template is None:
        raise ValueError(
            "tools / environment_factory: the chat template renders earlier turns differently once a tool result "
            "follows (it is not prefix-preserving), so a multi-turn completion cannot be built by appending tokens, "
            "and trl.chat_template_utils.get_training_chat_template has no prefix-preserving version of it. Set "
            "tokenizer.chat_template to a template that renders each turn the same whatever follows it: TRL ships "
            "training versions of common templates (Qwen, Llama 3, Gemma, GLM-4, GPT-OSS, DeepSeek, Phi-3, ...) as "
            "trl/chat_templates/*_training.jinja."
        )
    logger.info(
        "tools / environment_factory: the chat template is not prefix-preserving; prompts and tool results are "
        "rendered with TRL's training version of it (trl.chat_template_utils.get_training_chat_template), as "
        "trl.GRPOTrainer does. The tokenizer's own chat template is unchanged."
    )
    return template


def environment_tools(instance) -> list[Callable]:
    """The public methods of an environment (bound to it) but `reset` and `get_reward`, read on its class so that
    properties are not evaluated."""
    return [
        getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if not name.startswith("_") and name not in _ENVIRONMENT_PROTOCOL
    ]


# --- Environments ---


class EnvironmentCallError(RuntimeError):
    """An environment's factory or method (`reset`, `get_reward`) raised, timed out or returned the wrong type; the
    message names the class, the method and the row."""


def _has_content(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, list) or (isinstance(content, str) and bool(content.strip()))


def _prompt_text(prompt) -> str:
    return (prompt if isinstance(prompt, str) else str(prompt))[:200]


class Environments:
    """`environment_factory` as `{name: factory}` (`None` the one name of a single factory), a pool of instances per
    name, and the reward functions of the environments that define `get_reward`."""

    def __init__(self, environment_factory):
        self.multi = isinstance(environment_factory, dict)
        self.factories = dict(environment_factory) if self.multi else {None: environment_factory}
        self.pool: dict = {}
        self.reward_funcs: list[tuple[str, Callable]] = []  # (name, f(environments, **kwargs))
        for name, factory in self.factories.items():
            if not callable(factory):
                raise TypeError(
                    f"{self._where(name)} is a {type(factory).__name__}; it must be a callable returning an "
                    "environment."
                )
            instance = self._build(name)  # probed once, then the pool's first instance
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(
                    f"{self._where(name)} returned a {type(instance).__name__} without a `reset` method. Each "
                    "environment must define a callable `reset(**row)` (returning None, or a string appended to the "
                    "last user message)."
                )
            self.pool[name] = [instance]
            kind = type(instance)
            if callable(getattr(instance, "get_reward", None)) and kind.__name__ not in dict(self.reward_funcs):
                self.reward_funcs.append((kind.__name__, _environment_reward(kind)))

    def _where(self, name) -> str:
        return f"environment_factory[{name!r}]" if self.multi else "environment_factory"

    def _build(self, name):
        """A new instance from the factory of `name`; what the factory raises is named."""
        factory = self.factories[name]
        try:
            return factory()
        except Exception as error:
            label = getattr(factory, "__qualname__", None) or type(factory).__name__
            raise EnvironmentCallError(
                f"{self._where(name)} ({label}) raised {type(error).__name__}: {error} while building an environment "
                "instance. Fix the factory (it is called with no arguments, once per instance the pool needs)."
            ) from error

    def check_dataset(self, columns: list[str], environments: list | None, name: str) -> None:
        """With several environments, every row must name one of them in its `environment` column (`environments`:
        that column's values, None when there is none)."""
        if not self.multi:
            return
        if environments is None:
            raise ValueError(
                f"environment_factory is a dict (several environments) but {name} has no '{ENVIRONMENT_COLUMN}' column "
                f"(columns: {columns}). Add a column naming each row's environment, one of "
                f"{list(self.factories)}, or pass a single environment factory."
            )
        unknown = sorted(set(environments) - set(self.factories), key=str)
        if unknown:
            raise ValueError(
                f"{name} has rows with environment={unknown[0]!r}, which is not among the environments passed to "
                f"environment_factory: {list(self.factories)}."
            )

    def draw(self, rows: list[dict]) -> list:
        """One instance per row, from the pool of the row's environment (grown when a batch needs more)."""
        handed_out: dict = {}
        instances = []
        for row in rows:
            name = row.get(ENVIRONMENT_COLUMN) if self.multi else None
            if name not in self.factories:
                raise ValueError(
                    f"A row has environment={name!r}, which is not among the environments passed to "
                    f"environment_factory: {list(self.factories)}."
                )
            pool, index = self.pool[name], handed_out.get(name, 0)
            if index == len(pool):
                pool.append(self._build(name))
            handed_out[name] = index + 1
            instances.append(pool[index])
        return instances

    def reset(self, instances: list, rows: list[dict], prompts: list, timeout: float | None = None) -> list:
        """Start each instance's episode with `reset(**row)` (abandoned after `timeout` seconds, None: no limit); a
        string it returns is appended to the prompt's last message (a new list: the dataset's rows are left
        untouched). What `reset` raises, a timeout, a return value that is not None or a string, and a prompt still
        empty after it (training without a dataset: `reset` must write the prompt) are `EnvironmentCallError`s naming
        the class, the row and the fix."""
        reset_prompts = []
        for row_index, (instance, row, prompt) in enumerate(zip(instances, rows, prompts, strict=True)):
            kwargs = {k: v for k, v in row.items() if k != ENVIRONMENT_COLUMN} if self.multi else dict(row)
            method = f"{type(instance).__name__}.reset"
            where = f"on row {row_index} of the batch (prompt {_prompt_text(prompt)!r})"
            try:
                observation = call_with_deadline(functools.partial(instance.reset, **kwargs), timeout, method)
            except UserCodeTimeout as error:
                raise EnvironmentCallError(
                    f"{method}(**row) did not return within environment_reset_timeout={timeout:g} s {where}; it was "
                    "abandoned (a sync method keeps running in a background thread). Make reset return sooner, or "
                    "raise environment_reset_timeout (None: no limit)."
                ) from error
            except Exception as error:
                raise EnvironmentCallError(
                    f"{method}(**row) raised {type(error).__name__}: {error} {where}; it received the keyword "
                    f"arguments {sorted(kwargs)} (the row's columns). Fix reset, or give it **kwargs for columns it "
                    "does not use."
                ) from error
            if observation is not None and not isinstance(observation, str):
                raise EnvironmentCallError(
                    f"{method}(**row) returned {observation!r} ({type(observation).__name__}) {where}; it must return "
                    "None, or a str appended to the last user message."
                )
            if observation:
                prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
            if not any(_has_content(message) for message in prompt):
                raise EnvironmentCallError(
                    f"{method}(**row) returned {observation!r} {where}, and the prompt is still empty: without a "
                    "train_dataset (or with an empty prompt) reset must return the prompt's text. Return the task "
                    "as a str from reset, or pass a train_dataset with a 'prompt' column."
                )
            reset_prompts.append(prompt)
        return reset_prompts


def _environment_reward(kind: type) -> Callable:
    """A reward function scoring the rollouts whose environment is exactly `kind` with its `get_reward()` (None for
    the others), sync or async as `get_reward` is. What `get_reward` raises is named with the row."""

    def failed(row: int, error: Exception) -> EnvironmentCallError:
        return EnvironmentCallError(
            f"{kind.__name__}.get_reward() raised {type(error).__name__}: {error} on row {row} of the batch."
        )

    if inspect.iscoroutinefunction(kind.get_reward):

        async def get_reward(environments, **kwargs):
            rewards = []
            for row, env in enumerate(environments):
                try:
                    rewards.append(await env.get_reward() if type(env) is kind else None)
                except Exception as error:
                    raise failed(row, error) from error
            return rewards

    else:

        def get_reward(environments, **kwargs):
            rewards = []
            for row, env in enumerate(environments):
                try:
                    rewards.append(env.get_reward() if type(env) is kind else None)
                except Exception as error:
                    raise failed(row, error) from error
            return rewards

    get_reward.__name__ = kind.__name__
    return get_reward


# --- One round of tool calls ---


def parse_completion(tokenizer, ids: list[int], prefix: list[int], tools: list | None) -> dict:
    """The assistant message of a completion's ids (`prefix`: the ids before them): with `tool_calls` when the
    tokenizer's `response_template` finds some; plain text when it has none or the completion is malformed."""
    if getattr(tokenizer, "response_template", None) is not None:
        try:
            message = tokenizer.parse_response(ids, prefix=prefix, tools=tools or None)
            if message is None:
                raise ValueError("nothing parsed")
            message["content"] = (message.get("content") or "").removesuffix(tokenizer.eos_token or "\0")
            calls = message.get("tool_calls")
            if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
                raise ValueError("tool calls that are not a list of objects")
            return message
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
    return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}


def run_tool_calls(
    tool_calls: list[dict], tools: list[Callable], timeout: float | None = None
) -> tuple[list[tuple[str, object]], int, int]:
    """Results `(name, value)` of one turn's tool calls, in order, how many failed and how many of those timed out: a
    tool that raises, an unknown name, arguments that are not a mapping, an unsupported call type, or a tool still
    running after `timeout` seconds (None: no limit) gives `{"error": message}`, the result the model sees.

    A sync tool runs in a worker thread under the deadline and is abandoned when it passes (Python cannot kill a
    thread: it keeps running in the background); an async tool is cancelled (`concurrency`)."""
    by_name = {tool.__name__: tool for tool in tools}
    results: list = [None] * len(tool_calls)
    pending = {}  # index -> (name, coroutine)
    failures = timeouts = 0
    for index, call in enumerate(tool_calls):
        function = call.get("function", call) if isinstance(call, dict) else {}
        name = function.get("name", "unknown") if isinstance(function, dict) else "unknown"
        try:
            if isinstance(call, dict) and call.get("type", "function") != "function":
                raise ValueError(f"Unsupported tool call type: {call.get('type')}")
            if name not in by_name:
                raise ValueError(f"Tool {name} not found.")
            arguments = function.get("arguments") or {}
            tool = functools.partial(by_name[name], **arguments)
            value = tool() if inspect.iscoroutinefunction(by_name[name]) else call_with_deadline(tool, timeout, name)
            if inspect.iscoroutine(value):
                pending[index] = (name, value)
                continue
            results[index] = (name, value)
        except UserCodeTimeout:
            failures, timeouts = failures + 1, timeouts + 1
            results[index] = (name, {"error": _timed_out(name, timeout)})
        except Exception as error:
            failures += 1
            results[index] = (name, {"error": str(error)})
    if pending:
        coroutines = [coroutine for _, coroutine in pending.values()]
        try:
            outcomes = await_all(coroutines, return_exceptions=True, timeout=timeout)
        except UserCodeTimeout:  # a coroutine blocked the event loop: every pending call is abandoned
            outcomes = [UserCodeTimeout()] * len(pending)
        for (index, (name, _)), outcome in zip(pending.items(), outcomes, strict=True):
            if isinstance(outcome, UserCodeTimeout):
                failures, timeouts = failures + 1, timeouts + 1
                outcome = {"error": _timed_out(name, timeout)}
            elif isinstance(outcome, Exception):
                failures += 1
                outcome = {"error": str(outcome)}
            results[index] = (name, outcome)
    return results, failures, timeouts


def _timed_out(name: str, timeout: float | None) -> str:
    return f"Tool {name} did not return within {timeout:g} seconds."


def tool_suffix_ids(tokenizer, tool_messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """The token ids the chat template puts after an assistant turn's end-of-turn token for these tool results, up to
    and including the next assistant header: a dummy conversation rendered without and with them, the difference."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    kwargs = dict(tokenize=True, return_dict=False, **(chat_template_kwargs or {}))
    before = list(tokenizer.apply_chat_template(dummy, add_generation_prompt=False, **kwargs))
    after = list(tokenizer.apply_chat_template(dummy + tool_messages, add_generation_prompt=True, **kwargs))
    # A completion ends at its end-of-turn token: whatever the template puts after it (a newline) belongs to the suffix
    ends = [i for i, token in enumerate(before) if token == tokenizer.eos_token_id]
    if ends:
        before = before[: ends[-1] + 1]
    if after[: len(before)] != before:
        raise ValueError(
            "The chat template renders an assistant turn differently once a tool result follows it; tool results "
            "cannot be appended as tokens. Use a prefix-preserving chat template."
        )
    return after[len(before) :]


# --- The loop ---


@dataclass
class Episode:
    """One rollout's start, per row: the prompts to generate from (an environment's observation appended), the tools
    the row may call (None without tools), its environment instance (None without environments). Reward functions
    receive the instances as `environments`."""

    prompts: list
    row_tools: list[list[Callable]] | None = None
    environments: list | None = None


@dataclass
class MultiTurn:
    """Completions after the tool-calling rounds, one entry per row."""

    completion_ids: list[list[int]]  # every turn, tool results included
    tool_mask: list[list[int]]  # aligned with completion_ids: 1 on generated tokens, 0 on tool-result tokens
    completions: list[list[dict]]  # the messages: assistant, tool, assistant, ...
    tool_calls: int = 0
    tool_failures: int = 0  # calls whose result the model did not get: raised, timed out, unknown, or dropped
    tool_timeouts: int = 0  # calls abandoned at tool_timeout (counted among the failures too)
    dropped_results: int = 0  # calls whose result did not fit in the completion and was dropped
    rounds: int = 0
    timed_out_tools: set = field(default_factory=set)  # their names, for the warning


TOOL_METRICS = (
    "tools/call_frequency",
    "tools/failure_frequency",
    "tools/timeout_frequency",
    "tools/truncated_frequency",
)


def tool_metrics(turns: MultiTurn | None, rows: int, accelerator) -> dict[str, float]:
    """TRL's tool metrics over all processes, `tools/call_frequency` (tool calls per completion) and
    `tools/failure_frequency` (calls whose result the model did not get, per call; 0 without calls), and grpo-ext's
    `tools/timeout_frequency` (calls abandoned at `tool_timeout`) and `tools/truncated_frequency` (calls whose result
    did not fit in `max_completion_length` and was dropped), per call. `rows`: this process's completions."""
    counts = [0, 0, 0, 0]
    if turns is not None:
        counts = [turns.tool_calls, turns.tool_failures, turns.tool_timeouts, turns.dropped_results]
    totals = accelerator.reduce(torch.tensor(counts, device=accelerator.device), reduction="sum").tolist()
    calls = totals[0]
    return {
        TOOL_METRICS[0]: calls / (rows * accelerator.num_processes),
        **{name: count / calls if calls else 0.0 for name, count in zip(TOOL_METRICS[1:], totals[1:], strict=True)},
    }


def tool_call_loop(
    tokenizer,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    completions: list[dict],
    row_tools: list[list[Callable]],
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    eos_token_ids: list[int],
    max_completion_length: int,
    max_iterations: int | None,
    max_positions: int | None = None,
    chat_template_kwargs: dict | None = None,
    tool_timeout: float | None = None,
) -> MultiTurn:
    """Run the tool calls of the first turns (`completions`: one parsed assistant message per row) and let the model
    go on, until no row calls a tool, or `max_iterations` rounds.

    `generate(prompt_ids, prompt_mask, max_new_tokens, rows)` continues each left-padded history `(b, L)` (prompt +
    completion so far + tool results) of the batch's `rows` with one completion `(b, C)`; each is cut after its
    first stop token.

    A round's results that would push the completion past `max_completion_length` (or the model's `max_positions`)
    are dropped whole, as TRL drops them: the completion ends with the turn that called the tools, and those calls
    count as failed and in `dropped_results` (never as a success the model did not see).
    """
    result = MultiTurn(
        completion_ids=[list(ids) for ids in completion_ids],
        tool_mask=[[1] * len(ids) for ids in completion_ids],
        completions=[[message] for message in completions],
    )
    active = [i for i, message in enumerate(completions) if message.get("tool_calls")]
    while active and (max_iterations is None or result.rounds < max_iterations):
        continuing, histories = [], []  # rows that go on, and their prompt + completion + tool results
        for i in active:
            calls = result.completions[i][-1]["tool_calls"]
            outcomes, failures, timeouts = run_tool_calls(calls, row_tools[i], tool_timeout)
            result.tool_calls += len(outcomes)
            result.tool_failures += failures
            result.tool_timeouts += timeouts
            if timeouts:
                timed_out = [name for name, value in outcomes if value == {"error": _timed_out(name, tool_timeout)}]
                result.timed_out_tools.update(timed_out)
            for name, value in outcomes:
                if _holds_image(value):
                    raise NotImplementedError(
                        f"Tool {name!r} returned image parts: grpo-ext feeds tool results back as text, so the model "
                        "would read the image's repr, not the image. Return text from the tool (for example a "
                        "description), or drop the image parts."
                    )
            messages = [{"role": "tool", "name": name, "content": str(value)} for name, value in outcomes]
            suffix = tool_suffix_ids(tokenizer, messages, chat_template_kwargs)
            so_far = result.completion_ids[i] + suffix
            too_long = len(so_far) > max_completion_length or (
                max_positions is not None and len(prompt_ids[i]) + len(so_far) >= max_positions
            )
            if too_long:  # the results are dropped: the completion ends with the turn that called the tools
                result.dropped_results += len(outcomes)
                result.tool_failures += len(outcomes) - failures  # the model got none of them
                continue
            result.completions[i] += messages
            result.tool_mask[i] += [0] * len(suffix)
            result.completion_ids[i] = so_far
            continuing.append(i)
            histories.append(prompt_ids[i] + so_far)
        if not continuing:
            break
        room = [max_completion_length - len(result.completion_ids[i]) for i in continuing]
        turns = [[] for _ in continuing]
        if max(room) > 0:
            history_ids, history_mask = pad_token_lists(histories, tokenizer.pad_token_id, "left", device=None)
            turns = token_lists_until_stop(generate(history_ids, history_mask, max(room), continuing), eos_token_ids)
        next_active = []
        for i, history, ids, most in zip(continuing, histories, turns, room, strict=True):
            ids = ids[:most]
            result.completion_ids[i] += ids
            result.tool_mask[i] += [1] * len(ids)
            if ids:
                message = parse_completion(tokenizer, ids, history, row_tools[i])
                result.completions[i].append(message)
                if message.get("tool_calls"):
                    next_active.append(i)
        active = next_active
        result.rounds += 1
    return result


def _holds_image(value) -> bool:
    """Whether a tool's result is a list of content parts with an image (TRL's multimodal tool result)."""
    return isinstance(value, list) and any(isinstance(part, dict) and part.get("type") == "image" for part in value)


class ToolCalling:
    """Tools and environments of a trainer: checked once (with `chat_template`, the template prompts and tool results
    are rendered with: None for the tokenizer's own), then per rollout each row's environment instance and tools
    (`start`, an `Episode`); the rollout engine runs their turns (`tool_call_loop`); `report` warns, once each, about
    tools that timed out and results that did not fit."""

    def __init__(
        self,
        tokenizer,
        tools,
        environment_factory,
        max_iterations: int | None,
        tool_timeout: float | None = None,
        reset_timeout: float | None = None,
    ):
        self.tokenizer = tokenizer
        self.tools = list(tools or [])
        check_tool_support(tokenizer, self.tools)
        self.chat_template = training_chat_template(tokenizer)  # None: the tokenizer's own
        self.environments = Environments(environment_factory) if environment_factory is not None else None
        self.max_iterations = max_iterations
        self.tool_timeout, self.reset_timeout = tool_timeout, reset_timeout
        self._warned: set = set()  # what report() has said already

    @classmethod
    def from_config(cls, args, tokenizer, tools, environment_factory) -> ToolCalling:
        """A trainer's: `max_tool_calling_iterations`, `tool_timeout` and `environment_reset_timeout` from `args`."""
        return cls(
            tokenizer,
            tools,
            environment_factory,
            args.max_tool_calling_iterations,
            tool_timeout=args.tool_timeout,
            reset_timeout=args.environment_reset_timeout,
        )

    @property
    def reward_funcs(self) -> list[tuple[str, Callable]]:
        """(name, function) of each environment class that defines `get_reward`."""
        return self.environments.reward_funcs if self.environments is not None else []

    def check_dataset(self, dataset, name: str) -> None:
        """Conversational prompts, and with several environments an `environment` column naming known ones: every
        row of a map-style dataset, the first `ITERABLE_ROWS_CHECKED` of a stream (its later rows are checked as they
        are read: `data.checked_stream`, and `Environments.draw`)."""
        if dataset is None:
            return
        if isinstance(dataset, IterableDataset):
            rows = first_rows(dataset)
            columns = list(dataset.column_names or (rows[0] if rows else []))
            environments = [row.get(ENVIRONMENT_COLUMN) for row in rows]
            first = rows[0] if rows else None
        else:
            columns = list(dataset.column_names)
            environments = dataset[ENVIRONMENT_COLUMN] if ENVIRONMENT_COLUMN in columns else None
            first = dataset[0] if len(dataset) else None
        if self.environments is not None:
            self.environments.check_dataset(columns, environments if ENVIRONMENT_COLUMN in columns else None, name)
        if first is not None and "prompt" in first and not is_conversational(first["prompt"]):
            raise ValueError(
                f"tools / environment_factory need conversational prompts, but {name}'s 'prompt' column holds "
                f"{type(first['prompt']).__name__}s. Give each prompt as a list of messages, e.g. "
                '[{"role": "user", "content": "..."}]: the chat template renders the tools and the tool results.'
            )

    def start(self, rows: list[dict], prompts: list) -> Episode:
        """A new rollout: each row's environment drawn and reset (its observation appended to the prompt), and each
        row's tools (the standalone tools plus its environment's methods)."""
        if self.environments is None:
            return Episode(prompts, [self.tools] * len(rows))
        instances = self.environments.draw(rows)
        row_tools = [self.tools + environment_tools(instance) for instance in instances]
        return Episode(self.environments.reset(instances, rows, prompts, self.reset_timeout), row_tools, instances)

    def report(self, turns: MultiTurn | None) -> None:
        """Warn once per tool that timed out, and once that results were dropped for lack of room (the metrics count
        every case: `tools/timeout_frequency`, `tools/truncated_frequency`)."""
        if turns is None:
            return
        for name in sorted(turns.timed_out_tools - self._warned):
            self._warned.add(name)
            logger.warning(
                f"Tool {name!r} did not return within tool_timeout={self.tool_timeout:g} s and was abandoned; the "
                "model got an error result instead, counted in tools/failure_frequency and tools/timeout_frequency. "
                "A sync tool cannot be killed: it keeps running in a background thread. Make the tool return sooner "
                "(a timeout of its own on what it waits for), or raise tool_timeout (None: no limit)."
            )
        if turns.dropped_results and "dropped" not in self._warned:
            self._warned.add("dropped")
            logger.warning(
                f"The results of {turns.dropped_results} tool call(s) did not fit in max_completion_length (or the "
                "model's context) and were dropped: those completions end with the turn that called the tools, and "
                "the calls count as failed (tools/failure_frequency, tools/truncated_frequency). Raise "
                "max_completion_length, make the tools return shorter results, or lower max_tool_calling_iterations."
            )


def placeholder_dataset(environment_factory, args) -> Dataset:
    """Training without a dataset: one rollout's worth of empty prompts, which each environment's `reset()` fills
    (the sampler cycles through them; `max_steps` sets the length of training)."""
    if isinstance(environment_factory, dict):
        raise ValueError(  # TRL's message first
            "A `dict` `environment_factory` (multiple environments) requires a `train_dataset` with an `environment` "
            "column to route each example to its environment. Provide a dataset, or pass a single environment "
            "factory. The dataset's 'environment' column names each row's factory (a key of the dict)."
        )
    if args.max_steps <= 0:
        raise ValueError(  # TRL's message first
            "When training without a `train_dataset` (the environment owns the data and returns the prompt from "
            "`reset()`), `max_steps` must be set to a positive value to define the training length. Set it via "
            "`GRPOExtConfig(max_steps=...)`."
        )
    return Dataset.from_dict({"prompt": [EMPTY_PROMPT] * (args.generation_batch_size // args.num_generations)})
