"""Trainer callbacks: refreshing the snapshot reference, keeping the logs of an evaluation before training, and saving a
checkpoint when the run is interrupted."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class ReferenceSyncCallback(TrainerCallback):
    """Every `sync_steps` optimizer steps, pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref (`ReferencePolicy.sync`):
    the snapshot adapter reset to the trained one (alpha = 1), or TR-DPO's soft update (`sync_ref_model`)."""

    def __init__(self, reference, policy, sync_steps: int, alpha: float = 1.0):
        self.reference, self.policy, self.sync_steps, self.alpha = reference, policy, sync_steps, alpha

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.sync_steps == 0:
            self.reference.sync(self.policy, self.alpha)


class PreTrainingLogsCallback(TrainerCallback):
    """Keeps what `evaluate()` logged before `train()` (step 0: the base model's task metrics) at the head of the log
    history, which `train()` starts anew, so the curves and the model card show where the run started. A resumed run
    has them already, in its checkpoint's history."""

    def __init__(self):
        self.entries = []  # set by the trainer's train()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            state.log_history[:0] = self.entries
        self.entries = []


class SaveOnInterruptCallback(TrainerCallback):
    """SIGTERM (a scheduler's pre-emption) or a first Ctrl-C: finish the current step, save a checkpoint, stop.

    A second Ctrl-C aborts at once. `interrupted` tells the caller that training ended early; resume it with
    `trainer.train(resume_from_checkpoint=True)` (the recipe: `--resume_from_checkpoint true`).

    With several processes the signal may reach them at different steps, and a process that stops (or saves, a
    collective under FSDP / DeepSpeed) while the others go on would hang them all: at each step end the processes
    agree, and all stop at the first step end where any of them was interrupted.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.interrupted = False
        self.signal: int | None = None  # the signal this process received (None: stopped because another was)
        self._previous = {}

    @property
    def exit_code(self) -> int:
        """The status a script should exit with after an interrupted run: 128 + the signal's number, as a process
        killed by it would (143 for SIGTERM, 130 for Ctrl-C), so a scheduler that requeues pre-empted jobs does
        not read the run as finished; 0 when it was not interrupted."""
        if not self.interrupted:
            return 0
        return 128 + int(self.signal if self.signal is not None else signal.SIGTERM)

    def _handle(self, signum, frame):
        if self.interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.interrupted, self.signal = True, signum
        print(  # noqa: T201 - a signal handler: print, not logging, whose locks the interrupted code may hold
            f"\n[grpo-ext] {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping"
            + (" (Ctrl-C again to abort without saving)." if signum == signal.SIGINT else "."),
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupted, self.signal = False, None
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        self.interrupted = self._interrupted_anywhere(args.device)
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def _interrupted_anywhere(self, device) -> bool:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.interrupted
        flag = torch.tensor([float(self.interrupted)], device=device)  # one number per optimizer step
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        """Put back the handlers that were installed before training (also called when `train()` raises)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}
