"""Logging never ends a run: a completions parquet file that cannot be written (read-only or full disk), a tracker
that fails (wandb, trackio, TensorBoard, ... : network, API, disk) is a warning naming where and why, said once per
destination, and training goes on. Only saving a checkpoint may stop a run (checkpoints.py): losing a log line costs
little, losing the step that was just computed costs the run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from transformers import TrainerCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

logger = logging.getLogger(__name__)

TRACKER_CALLBACKS = tuple(INTEGRATION_TO_CALLBACK.values())  # what `report_to` adds to the trainer


class LoggingGuard:
    """Runs logging actions so that a failure is a warning (once per destination) instead of an exception."""

    def __init__(self):
        self.failures: dict[str, int] = {}  # destination -> failed attempts

    def run(self, destination: str, action: Callable[[], object]) -> bool:
        """`action()`; if it raises, warn (the first time for `destination`) and return False."""
        try:
            action()
            return True
        except Exception as error:
            self.failures[destination] = self.failures.get(destination, 0) + 1
            if self.failures[destination] == 1:
                logger.warning(
                    f"Logging to {destination} failed ({type(error).__name__}: {error}). Training goes on without "
                    "it; only this first failure is reported (trainer.logging_failures counts them all). Fix the "
                    "cause (permissions, disk space, the tracker's network or credentials) to get this logging back."
                )
            return False

    def guard_trackers(self, callbacks: list[TrainerCallback]) -> None:
        """Wrap every event method (`on_log`, `on_train_begin`, ...) of the tracker callbacks among `callbacks` (those
        `report_to` adds) so that what they raise goes through `run`."""
        for callback in callbacks:
            if not isinstance(callback, TRACKER_CALLBACKS):
                continue
            destination = f"the {type(callback).__name__.removesuffix('Callback')} tracker"
            for name in dir(type(callback)):  # on the class: an instance's properties are not evaluated
                if name.startswith("on_") and callable(getattr(type(callback), name)):
                    setattr(callback, name, self._guarded(destination, getattr(callback, name)))

    def _guarded(self, destination: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def guarded(*args, **kwargs):
            result = []
            self.run(destination, lambda: result.append(method(*args, **kwargs)))
            return result[0] if result else None  # None leaves the trainer's control as it was

        return guarded
