"""Awaiting async user code (reward functions, tools) from the trainer's synchronous step."""

from __future__ import annotations

import asyncio
import concurrent.futures


def await_all(coroutines: list, return_exceptions: bool = False) -> list:
    """Await the coroutines concurrently and return their results in order, on a private event loop, so this also
    works when the caller already runs inside one (Jupyter)."""

    async def gather():
        return await asyncio.gather(*coroutines, return_exceptions=return_exceptions)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()
