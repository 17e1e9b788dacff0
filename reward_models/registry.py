"""Reward functions by name, for configs and command lines: registry names or dotted import paths.

`get_reward_funcs(["accuracy", "format", "cosine"], max_len=2048)` returns ready-to-use reward functions. A registry
entry is either a reward function (it takes `completions`) or a factory that builds one (it does not); factories are
called with the keyword arguments their signature accepts. Anything importable works too:
`"my_pkg.rewards:my_func"` or `"my_pkg.rewards.my_func"`.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable

from .accuracy import accuracy_reward, answer_line_reward
from .format import answer_format_reward, r1_format_reward, tag_count_reward
from .length import get_cosine_scaled_reward, get_soft_overlong_reward

REWARD_FUNCS: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "answer_line": answer_line_reward,
    "answer_format": answer_format_reward,
    "format": r1_format_reward,
    "tag_count": tag_count_reward,
    "cosine": get_cosine_scaled_reward,
    "soft_overlong": get_soft_overlong_reward,
}


def _unknown(name: str, reason: str = "") -> ValueError:
    return ValueError(
        f"Unknown reward function {name!r}{reason}. Use a registry name ({', '.join(sorted(REWARD_FUNCS))}) or a "
        "dotted import path to a function or factory, as 'my_pkg.rewards:my_func' or 'my_pkg.rewards.my_func'."
    )


def import_object(path: str):
    """The object at `"module.sub:attr.attr"` or `"module.sub.attr"` (the longest importable module prefix)."""
    if ":" in path:
        module_name, _, attribute = path.partition(":")
        candidates = [(module_name, attribute)]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    for module_name, attribute in candidates:
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not module_name.startswith(error.name):
                raise  # the module exists but one of its own imports is missing: show that error
            continue
        try:
            for part in attribute.split("."):
                target = getattr(target, part)
        except AttributeError as error:
            raise _unknown(path, f" ({module_name!r} has no attribute {attribute!r})") from error
        return target
    raise _unknown(path, " (no module of that path can be imported)")


def is_factory(obj) -> bool:
    """A factory builds a reward function; a reward function takes `completions` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    if "completions" in parameters:
        return False
    return not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) or inspect.isclass(obj)


def _build(name: str, factory: Callable, factory_kwargs: dict) -> tuple[Callable, set[str]]:
    """Call `factory` with the keyword arguments it accepts; return the reward function and the names it used."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = dict(factory_kwargs)
    else:
        kwargs = {key: value for key, value in factory_kwargs.items() if key in parameters}
    missing = [
        key
        for key, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and key not in kwargs
    ]
    if missing:
        raise ValueError(
            f"Reward function {name!r} is built by a factory that needs {', '.join(missing)}: pass "
            f"{', '.join(f'{key}=...' for key in missing)} to get_reward_funcs."
        )
    return factory(**kwargs), set(kwargs)


def get_reward_funcs(names: list[str], warn_unused: bool = True, **factory_kwargs) -> list[Callable]:
    """Reward functions for registry names or dotted import paths, factories built with `factory_kwargs`.

    A keyword argument that none of the requested factories accepts triggers a warning (it is most likely a typo),
    unless `warn_unused=False` (a script passing the same run settings to whatever factories its config names).
    Callables in `names` are passed through unchanged.
    """
    if isinstance(names, str):
        names = [names]
    funcs, used = [], set()
    for name in names:
        if callable(name):
            funcs.append(name)
            continue
        if name in REWARD_FUNCS:
            obj = REWARD_FUNCS[name]
        elif "." in name or ":" in name:
            obj = import_object(name)
        else:
            raise _unknown(name)
        if is_factory(obj):
            obj, accepted = _build(name, obj, factory_kwargs)
            used |= accepted
        if not callable(obj):
            raise ValueError(f"{name!r} resolved to a {type(obj).__name__}, which is not a reward function.")
        funcs.append(obj)
    unused = sorted(set(factory_kwargs) - used)
    if unused and warn_unused:
        warnings.warn(
            f"get_reward_funcs: no requested reward factory takes {', '.join(unused)}; they were ignored.",
            stacklevel=2,
        )
    return funcs
