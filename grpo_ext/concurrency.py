"""Calling user code (reward functions, tools, environments' `reset`) from the trainer's synchronous step: async code
awaited concurrently, also inside a running event loop (Jupyter), and every call under a deadline so that code that
never returns cannot freeze a run.

A synchronous Python function cannot be killed from outside: with a deadline it runs in a worker thread, and when
the deadline passes the caller stops waiting and the thread is abandoned (a daemon thread: it does not keep the
process alive, but whatever it holds, a socket or a lock, stays held until it returns). An async function is
cancelled at its deadline (`asyncio.wait`); one that blocks its event loop (`time.sleep` or blocking I/O inside
`async def`) cannot be, so the loop itself runs in a worker thread and is abandoned at `loop_deadline(timeout)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class UserCodeTimeout(TimeoutError):
    """User code did not return before its deadline; the call was abandoned. The message names it."""


def loop_deadline(timeout: float) -> float:
    """How long an event loop running async calls of `timeout` seconds each is given before it is abandoned as
    blocked: the calls are cancelled at `timeout`, the rest is time for their clean-up."""
    return 2 * timeout + 1.0


def call_with_deadline(call: Callable[[], T], timeout: float | None, what: str) -> T:
    """`call()`, or `UserCodeTimeout` naming `what` if it has not returned after `timeout` seconds (None: no limit,
    called in this thread). The worker thread keeps this thread's grad mode, CUDA device and context variables."""
    if timeout is None:
        return call()
    outcome: dict = {}
    context, grad_enabled = contextvars.copy_context(), torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run():
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = context.run(call)
        except BaseException as error:  # handed to the caller, which raises it
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"grpo-ext {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise UserCodeTimeout(f"{what} did not return within {timeout:g} s; it was abandoned (still running).")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def _bounded(coroutine, timeout: float | None):
    """The coroutine's result, or `UserCodeTimeout` once it has run `timeout` seconds (it is then cancelled). A
    `TimeoutError` the coroutine raises itself stays what it is."""
    task = asyncio.ensure_future(coroutine)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise UserCodeTimeout(f"did not return within {timeout:g} s; it was cancelled.")
    return task.result()


def await_all(coroutines: list, return_exceptions: bool = False, timeout: float | None = None) -> list:
    """Await the coroutines concurrently and return their results in order, on a private event loop, so this also
    works when the caller already runs inside one (Jupyter).

    With `timeout`, each coroutine still running after `timeout` seconds is cancelled and gives `UserCodeTimeout`
    (raised, or in its place with `return_exceptions`); a loop that has not finished after `loop_deadline(timeout)`
    (a coroutine blocks it) is abandoned and `UserCodeTimeout` is raised for the whole batch."""

    async def gather():
        bounded = [_bounded(coroutine, timeout) for coroutine in coroutines]
        return await asyncio.gather(*bounded, return_exceptions=return_exceptions)

    if timeout is not None:
        return call_with_deadline(
            lambda: asyncio.run(gather()), loop_deadline(timeout), "the event loop of async calls (one blocks it)"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()
