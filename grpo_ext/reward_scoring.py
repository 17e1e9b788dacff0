"""Calling reward functions and reward models with TRL's contract, and checking what they return.

A reward function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, sync or async;
`columns` are the dataset's other columns (one value per completion) plus, as in TRL, `trainer_state`, `log_metric`
(`log_metric(name, value)`: a scalar the trainer averages over processes and logs with its metrics) and `log_extra`
(`log_extra(column, values)`: one value per completion, a column of the completions table). `None` means "this
function does not score this completion" and becomes NaN, which the advantages skip. A sequence-classification
reward model, or a string naming one (path or id), is wrapped in `reward_models.NeuralRewardModel`, the one
reward-model scorer, and called like any other function.

A NaN or +/-inf returned by a function (not None) is caught where it appears: an error naming the function, the row
and the count (`nonfinite_rewards="error"`, the default), or dropped like None and counted (`"drop"`). Each function
gets its own deep copy of the prompts, completions and columns, so none can change what the others (or the logged
completions table) see.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import PreTrainedModel

from reward_models.neural import NeuralRewardModel

from .concurrency import UserCodeTimeout, await_all, call_with_deadline, loop_deadline

logger = logging.getLogger(__name__)

# What to do with a NaN / +-inf reward: stop with an error naming it, or leave it out like None (and count it).
NONFINITE_REWARD_POLICIES = ("error", "drop")


def check_reward_settings(args) -> None:
    """A config's `nonfinite_rewards` is a policy `RewardScorer` knows (run by `settings.check_settings`, at trainer
    start, before the scorer is built)."""
    if args.nonfinite_rewards not in NONFINITE_REWARD_POLICIES:
        raise ValueError(
            f"nonfinite_rewards={args.nonfinite_rewards!r} is not one of {NONFINITE_REWARD_POLICIES}: `error` stops at "
            "a NaN / infinite reward, `drop` leaves it out of that function's reward."
        )


# Arguments passed to every function as they are, not copied: the trainer's live state, the logging callbacks and,
# with an environment_factory, the rollouts' environment instances.
SHARED_ARGUMENTS = ("trainer_state", "environments", "log_extra", "log_metric")
# Arguments every reward function receives besides the dataset columns.
REWARD_FUNCTION_ARGUMENTS = {"prompts", "completions", "completion_ids", *SHARED_ARGUMENTS}


class RewardFunctionError(ValueError):
    """A reward function misbehaved; the message names it, the row and the fix."""


def _name_of(reward_func) -> str:
    if isinstance(reward_func, str):
        return reward_func.rstrip("/").split("/")[-1]
    if isinstance(reward_func, PreTrainedModel):
        return str(getattr(reward_func.config, "_name_or_path", "") or type(reward_func).__name__).split("/")[-1]
    return getattr(reward_func, "__name__", None) or type(reward_func).__name__


def _is_async(func) -> bool:
    """An `async def` function, or an object whose `__call__` is one."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _text(message_or_text) -> str:
    return message_or_text if isinstance(message_or_text, str) else str(message_or_text)


def _required_arguments(func) -> list[str]:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in REWARD_FUNCTION_ARGUMENTS
    ]


def _check_reward_model_name(name: str, where: str) -> None:
    """A string in `reward_funcs` is a reward model's path or Hub id. Refuse, before the Hub is asked, a name of
    grpo-ext's reward registry or a dotted import path (the recipe's `--reward_funcs` reads those, the trainer takes
    functions), and a path that does not exist."""
    from reward_models.registry import REWARD_FUNCS

    dotted = "." in name and "/" not in name and not os.path.exists(name)
    if name in REWARD_FUNCS or dotted:
        raise ValueError(
            f"{where}={name!r} is a reward function's name, but the trainer reads a string in reward_funcs as a "
            "reward model's path or Hub id. Pass the function itself: `from reward_models import get_reward_funcs; "
            f"reward_funcs=get_reward_funcs([{name!r}])` (registry names: {', '.join(sorted(REWARD_FUNCS))}; "
            "dotted import paths work too)."
        )
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"{where}={name!r}: no such reward model folder (relative paths start from {os.getcwd()}). Give the "
            "folder of a sequence-classification model (its config.json and weights), or a Hub id 'owner/name'."
        )


class RewardScorer:
    """Holds the reward functions, their names and weights, and scores a batch of completions: `(B, K)` rewards."""

    def __init__(
        self,
        reward_funcs,
        reward_weights: Sequence[float] | None = None,
        reward_processing_classes=None,
        model_init_kwargs: dict | None = None,
        chat_template_kwargs: dict | None = None,
        nonfinite_rewards: str = "error",
        extra_funcs: Sequence[tuple[str, Callable]] = (),
        timeout: float | None = None,
    ):
        """`extra_funcs`: (name, function) reward sources after `reward_funcs`, weight 1 each (environments'
        `get_reward`). `timeout`: seconds a reward function (not a reward model, grpo-ext's own code) may run on a
        batch before it is abandoned with a `RewardFunctionError`; None: no limit. `nonfinite_rewards`: one of
        `NONFINITE_REWARD_POLICIES` (a config's value is checked at trainer start, `check_reward_settings`)."""
        self.timeout = timeout
        self.nonfinite_rewards = nonfinite_rewards
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            if not extra_funcs:
                raise ValueError(  # TRL's message first
                    "No reward source provided. Pass `reward_funcs`, or an `environment_factory` whose environment "
                    "defines a `get_reward` method. With no reward source every advantage would be 0: give at least "
                    "one reward function, reward model or its path."
                )
            reward_funcs = []
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if reward_processing_classes is None:
            reward_processing_classes = [None] * len(reward_funcs)
        elif not isinstance(reward_processing_classes, (list, tuple)):
            reward_processing_classes = [reward_processing_classes]
        if len(reward_processing_classes) != len(reward_funcs):
            raise ValueError(  # TRL's message first
                f"The number of reward processing classes ({len(reward_processing_classes)}) must match the number of "
                f"reward functions ({len(reward_funcs)}). Give reward_processing_classes one entry per reward "
                "function, in the same order (None for plain functions)."
            )
        self.funcs = []  # what `score` calls: reward models wrapped in NeuralRewardModel
        self.reward_funcs = []  # TRL's view: a reward model as its nn.Module, functions as given
        self.processing_classes = []  # TRL's view: a reward model's tokenizer, else the entry given
        for index, (func, processing_class) in enumerate(zip(reward_funcs, reward_processing_classes, strict=True)):
            if isinstance(func, str):
                _check_reward_model_name(func, f"reward_funcs[{index}]")
            if isinstance(func, (str, nn.Module)):
                func = NeuralRewardModel(
                    func,
                    tokenizer=processing_class,
                    chat_template_kwargs=chat_template_kwargs,
                    name=_name_of(func),
                    **(model_init_kwargs or {}) if isinstance(func, str) else {},
                )
                self.reward_funcs.append(func.model)
                self.processing_classes.append(func.tokenizer)
            elif not callable(func):
                raise TypeError(
                    f"reward_funcs[{index}] is a {type(func).__name__}, not a reward function: pass a callable "
                    "f(prompts, completions, completion_ids, **columns) -> list[float], a reward model, or its path."
                )
            else:
                self.reward_funcs.append(func)
                self.processing_classes.append(processing_class)
            self.funcs.append(func)
        self.names = [_name_of(func) for func in self.funcs]
        self.set_weights([1.0] * len(self.funcs) if reward_weights is None else reward_weights)
        # Reward sources of the environments (their get_reward), weight 1 each, after the user's functions
        self.funcs += [func for _, func in extra_funcs]
        self.names += [name for name, _ in extra_funcs]
        self.reward_funcs += [func for _, func in extra_funcs]
        self.processing_classes += [None] * len(extra_funcs)
        self.weights = torch.cat([self.weights, torch.ones(len(extra_funcs))])  # (K,)
        # Non-finite rewards each function returned in the last `score` call (dropped when the policy is "drop")
        self.nonfinite_counts = [0] * len(self.funcs)
        # What the functions logged through `log_metric` / `log_extra` in the last `score` call
        self.logged_metrics: dict[str, list[float]] = defaultdict(list)
        self.logged_columns: dict[str, list] = defaultdict(list)

    @classmethod
    def from_config(cls, args, reward_funcs, reward_processing_classes=None, extra_funcs=()) -> RewardScorer:
        """A trainer's: weights, reward-model loading, chat template, non-finite policy and timeout from `args`."""
        return cls(
            reward_funcs,
            reward_weights=args.reward_weights,
            reward_processing_classes=reward_processing_classes,
            model_init_kwargs=args.model_init_kwargs,
            chat_template_kwargs=args.chat_template_kwargs,
            nonfinite_rewards=args.nonfinite_rewards,
            extra_funcs=extra_funcs,
            timeout=args.reward_timeout,
        )

    def set_weights(self, reward_weights) -> None:
        """One weight per function, in the order of the functions."""
        weights = torch.as_tensor(reward_weights, dtype=torch.float32).flatten().cpu()  # (K,)
        if weights.numel() != len(self.funcs):
            raise ValueError(  # TRL's message first
                f"Number of reward weights ({weights.numel()}) must match number of reward functions "
                f"({len(self.funcs)}): {', '.join(self.names)}. Give reward_weights one weight per function, in the "
                "same order."
            )
        self.weights = weights

    def log_metric(self, name: str, value: float) -> None:
        """Passed to reward functions as `log_metric`: a scalar for this batch, logged as the metric `name`."""
        if not isinstance(value, numbers.Real) and not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise RewardFunctionError(
                f"log_metric({name!r}, {value!r}): the value is a {type(value).__name__}; log one float per call."
            )
        self.logged_metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        """Passed to reward functions as `log_extra`: one value per completion of the batch, a column of the
        completions table."""
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise RewardFunctionError(
                f"log_extra({column!r}, {values!r}): the values are a {type(values).__name__}; log a list with one "
                "value per completion of the batch, in the order received (log_metric logs one number)."
            )
        self.logged_columns[column].extend(values)

    def gather_logs(self, accelerator, batch_size: int) -> tuple[dict[str, float], dict[str, list]]:
        """What the functions logged in the last `score` call, from every process: each `log_metric` name with the
        mean of all its values, and each `log_extra` column over all processes' completions (None where a process
        logged none). Names are sorted so every process gathers them in the same order."""
        metrics = {}
        for name in sorted(set(gather_object(list(self.logged_metrics)))):
            values = self.logged_metrics.get(name, [])
            totals = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=accelerator.device)
            total, count = accelerator.reduce(totals, reduction="sum").tolist()
            metrics[name] = total / count
        columns = {
            column: gather_object(self.logged_columns.get(column, [None] * batch_size))
            for column in sorted(set(gather_object(list(self.logged_columns))))
        }
        return metrics, columns

    def required_columns(self) -> dict[str, list[str]]:
        """Per function name: the keyword arguments it needs with no default, which must come from dataset columns."""
        return {name: _required_arguments(func) for func, name in zip(self.funcs, self.names, strict=True)}

    @property
    def reward_models(self) -> list[nn.Module]:
        return [func.model for func in self.funcs if isinstance(func, NeuralRewardModel)]

    def weighted_sum(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """r_i = sum_k w_k r_ik over the functions that scored completion i; NaN where none did. `(B,)`"""
        rewards = (rewards_per_func * self.weights.to(rewards_per_func.device)).nansum(dim=1)  # (B,)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return rewards

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict) -> torch.Tensor:
        """Rewards `(B, K)` for B completions from K functions (NaN where a function returned None).

        A NaN / +-inf a function returns raises `RewardFunctionError` (`nonfinite_rewards="error"`) or becomes NaN
        (`"drop"`); `nonfinite_counts` then says how many each function returned. Rows no function scored are
        reported with a warning, as TRL does. What the functions log with `log_metric` / `log_extra` is then in
        `logged_metrics` / `logged_columns` (a column must have one value per completion).
        """
        rewards = torch.full((len(prompts), len(self.funcs)), torch.nan, dtype=torch.float32)
        self.nonfinite_counts = [0] * len(self.funcs)
        self.logged_metrics.clear()
        self.logged_columns.clear()
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        kwargs.update(log_extra=self.log_extra, log_metric=self.log_metric)
        async_calls = []
        for k, func in enumerate(self.funcs):
            if _is_async(func):
                async_calls.append(k)
            else:
                rewards[:, k] = self._check(k, self._call(k, func, self._own_copy(kwargs)), prompts)
        if async_calls:
            coroutines = [self._call_async(k, self.funcs[k], self._own_copy(kwargs)) for k in async_calls]
            try:
                outputs = await_all(coroutines, return_exceptions=True, timeout=self.timeout)
            except UserCodeTimeout as error:  # the event loop itself was blocked
                names = ", ".join(repr(self.names[k]) for k in async_calls)
                raise RewardFunctionError(
                    f"The async reward functions {names} had not finished {loop_deadline(self.timeout):g} s after "
                    f"their start, although each is cancelled at reward_timeout={self.timeout:g} s: one of them blocks "
                    "the event loop (a sync call such as time.sleep or blocking I/O inside `async def`), so it cannot "
                    "be cancelled. Use awaitable calls (asyncio.sleep, an async client), or make the function sync."
                ) from error
            for k, output in zip(async_calls, outputs, strict=True):
                if isinstance(output, UserCodeTimeout):
                    raise self._timed_out(k, len(prompts)) from output
                if isinstance(output, BaseException):
                    raise output
                rewards[:, k] = self._check(k, output, prompts)
        for column, values in self.logged_columns.items():
            if len(values) != len(prompts):
                raise RewardFunctionError(
                    f"log_extra({column!r}, ...) was given {len(values)} values in all for a batch of {len(prompts)} "
                    "completions; log exactly one value per completion, in the order received, once per batch."
                )
        self._warn_unscored_rows(rewards, prompts, completions, columns)
        return rewards

    # --- calling and checking ---

    @staticmethod
    def _own_copy(kwargs: dict) -> dict:
        """A deep copy of the inputs for one function, so what it changes in place no other function sees."""
        return {key: value if key in SHARED_ARGUMENTS else copy.deepcopy(value) for key, value in kwargs.items()}

    def _call(self, k: int, func: Callable, kwargs: dict):
        """`func(**kwargs)` under `timeout` (reward models, grpo-ext's own code, without one)."""
        timeout = None if isinstance(func, NeuralRewardModel) else self.timeout
        try:
            return call_with_deadline(lambda: func(**kwargs), timeout, f"reward function '{self.names[k]}'")
        except UserCodeTimeout as error:
            raise self._timed_out(k, len(kwargs["prompts"])) from error
        except Exception as error:
            raise self._failure(k, kwargs, error) from error

    async def _call_async(self, k: int, func: Callable, kwargs: dict):
        try:
            return await func(**kwargs)
        except Exception as error:
            raise self._failure(k, kwargs, error) from error

    def _timed_out(self, k: int, batch: int) -> RewardFunctionError:
        sync = "a sync function keeps running in a background thread; " if not _is_async(self.funcs[k]) else ""
        return RewardFunctionError(
            f"Reward function '{self.names[k]}' did not return within reward_timeout={self.timeout:g} s on a batch "
            f"of {batch} completions; it was abandoned ({sync}the step is stopped rather than frozen). Make it return "
            "sooner (a timeout of its own on what it waits for: an API, a sandbox), or raise reward_timeout (None: "
            "no limit)."
        )

    def _failure(self, k: int, kwargs: dict, error: Exception) -> RewardFunctionError:
        """The function's name and its exception. The function is not called again row by row to find the row: a
        call may be slow, costly or have side effects (an API, a sandbox); the traceback points into the function."""
        hint = ""
        if self.timeout is not None and ("main thread" in str(error) or "threaded environment" in str(error)):
            hint = (
                f" With reward_timeout={self.timeout:g} a sync reward function runs in a worker thread, where "
                "signal-based code (signal.alarm, math-verify's own timeouts) cannot run: set reward_timeout=None to "
                "call it on the main thread, or turn its signal-based timeout off."
            )
        return RewardFunctionError(
            f"Reward function '{self.names[k]}' raised {type(error).__name__}: {error} (on a batch of "
            f"{len(kwargs['prompts'])} completions; see the traceback above for where). Fix the function, or return "
            f"None for completions it cannot score (they are then left out of that function's reward).{hint}"
        )

    def _check(self, k: int, output, prompts: list) -> torch.Tensor:
        name = self.names[k]
        if isinstance(output, torch.Tensor):
            output = output.tolist()
        if not isinstance(output, (list, tuple)):
            raise RewardFunctionError(
                f"Reward function '{name}' returned a {type(output).__name__}; it must return a list with one float "
                f"(or None) per completion, here {len(prompts)}."
            )
        if len(output) != len(prompts):
            raise RewardFunctionError(
                f"Reward function '{name}' returned {len(output)} rewards for {len(prompts)} completions; return "
                "exactly one reward (float or None) per completion, in the order received."
            )
        values = []
        for row, value in enumerate(output):
            if value is None:
                values.append(None)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                values.append(float(value))
            else:
                raise RewardFunctionError(
                    f"Reward function '{name}' returned {value!r} ({type(value).__name__}) on row {row} of the batch "
                    f"(prompt {_text(prompts[row])[:200]!r}); rewards must be int, float or None."
                )
        return self._drop_nonfinite(k, values, prompts)

    def _drop_nonfinite(self, k: int, values: list, prompts: list) -> torch.Tensor:
        """`(B,)` rewards with None as NaN; a NaN / +-inf the function returned itself raises or is dropped (NaN)."""
        nonfinite = [row for row, value in enumerate(values) if value is not None and not math.isfinite(value)]
        if nonfinite and self.nonfinite_rewards == "error":
            row = nonfinite[0]
            raise RewardFunctionError(
                f"Reward function '{self.names[k]}' returned {values[row]} on row {row} of the batch (prompt "
                f"{_text(prompts[row])[:200]!r}), {len(nonfinite)} non-finite reward(s) of {len(values)} in all. A NaN "
                "or infinite reward would turn the advantages, and then every weight, into NaN. Return a finite "
                "float, or None for completions the function cannot score; or set nonfinite_rewards='drop' to leave "
                "such values out of this function's reward (counted in rewards/<name>/nonfinite)."
            )
        self.nonfinite_counts[k] = len(nonfinite)
        return torch.tensor(
            [math.nan if value is None or not math.isfinite(value) else value for value in values], dtype=torch.float32
        )

    def _warn_unscored_rows(self, rewards: torch.Tensor, prompts: list, completions: list, columns: dict) -> None:
        """Warn, as TRL does (same condition and wording, the first such row's columns, prompt and completion), about
        completions no function scored: their advantage is 0, they do not train."""
        unscored = torch.isnan(rewards).all(dim=1).nonzero(as_tuple=True)[0].tolist()  # rows
        if not unscored:
            return
        row = unscored[0]
        row_kwargs = {key: value[row] for key, value in columns.items() if key not in SHARED_ARGUMENTS}
        row_kwargs.update(prompt=prompts[row], completion=completions[row])
        logger.warning(
            f"All reward functions returned None for the following kwargs:\n{row_kwargs}\n"
            "Please ensure that at least one reward function returns a valid reward. "
            f"({len(unscored)} of {rewards.size(0)} completions in this batch were scored by no function; they get "
            "advantage 0 and do not train.)"
        )
