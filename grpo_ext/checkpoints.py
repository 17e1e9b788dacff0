"""Checkpoints a run can trust: which folders are complete, whether a resume matches them, and a full disk named.

transformers' `get_last_checkpoint` picks the `checkpoint-N` folder with the largest N, complete or not: a process
killed while writing it leaves a folder `resume_from_checkpoint=True` then fails on. Here a folder counts only when
its files say it was finished: `trainer_state.json` (written last by `Trainer._save_checkpoint`) parses, and model or
adapter weights are there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager

from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
# grpo-ext's state beyond transformers' own, saved in each checkpoint folder: the run's settings, the adaptive KL.
STATE_FILE = "grpo_ext_state.json"
# Any one of these means the weights were written: an adapter, a full model (single file or sharded index), or the
# engine-specific layouts of DeepSpeed (`global_stepN/`) and FSDP's sharded state dict (`pytorch_model_fsdp_0/`).
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_FOLDER_PATTERN = re.compile(r"^(global_step\d+|pytorch_model_fsdp_\d+)$")
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

# Settings a checkpoint is tied to (saved in grpo-ext's state file, compared on resume): a different value is an
# error for those that change what the saved optimizer state and data position mean, a warning for the model path.
RESUME_MUST_MATCH = ("num_generations", "loss_type")
RESUME_SHOULD_MATCH = ("model",)


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is): a missing or unreadable trainer state, or no
    weights."""
    folder = os.fspath(folder)
    state = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"no {TRAINER_STATE}"
    for name in (TRAINER_STATE, STATE_FILE):  # grpo-ext's state file is optional (older checkpoints lack it)
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as file:
                json.load(file)
        except (OSError, ValueError) as error:
            return f"{name} is unreadable ({type(error).__name__}: {error}), cut off while being written or corrupt"
    names = os.listdir(folder)
    has_weights = any(name in WEIGHT_FILES for name in names) or any(
        WEIGHT_FOLDER_PATTERN.match(name) and os.path.isdir(os.path.join(folder, name)) for name in names
    )
    if not has_weights:
        return f"no model or adapter weights (none of {', '.join(WEIGHT_FILES[:3])}, ...)"
    return None


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """`output_dir` can be written (or created): a folder that cannot would train, then lose the work at the first
    save. Probed by creating a temporary file, so a read-only file system or missing permissions are both seen."""
    folder = os.fspath(output_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(
            f"output_dir={folder!r} is a file, not a folder: checkpoints and the trained model could not be saved. "
            "Choose another output_dir."
        )
    existing = folder
    while not os.path.isdir(existing):  # the folder itself, or the nearest parent it will be created in
        existing = os.path.dirname(existing) or "."
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(
            errno.EACCES,
            f"output_dir={folder!r} cannot be written ({existing} refuses a new file: {error.strerror or error}): "
            "the checkpoints and the trained model would be lost at the first save. Choose a writable output_dir, "
            "or fix the folder's permissions.",
        ) from error


def _checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    steps = {
        int(match.group(1)): name
        for name in os.listdir(output_dir)
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    }
    return [os.path.join(output_dir, steps[step]) for step in sorted(steps, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N whose files are complete, warning about each
    newer one skipped; None when there is none."""
    for folder in _checkpoint_folders(output_dir):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        warnings.warn(
            f"Skipping {folder} on resume: it is incomplete ({reason}), most likely because the process was killed "
            "while saving it. Resuming from the newest complete checkpoint instead; delete the folder once you no "
            "longer need it.",
            stacklevel=3,
        )
    return None


def check_checkpoint_weights(checkpoint: str, adapter: bool) -> None:
    """A run training a PEFT adapter (`adapter`) resumes from an adapter checkpoint, a full-model run from a full
    model's: the saved optimizer state belongs to the parameters that were trained (checked by the files, so
    checkpoints of any grpo-ext version are; DeepSpeed / FSDP layouts, which hold neither file, are left alone)."""
    names = os.listdir(checkpoint)
    has_adapter = any(name.startswith("adapter_model.") for name in names)
    has_model = any(name.startswith(("model.safetensors", "pytorch_model.bin")) for name in names)
    if adapter and has_model and not has_adapter:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it holds a full model's weights (no adapter_model.*) but this run "
            "trains a PEFT adapter (peft_config), so the saved optimizer state belongs to other parameters. Resume "
            f"without peft_config, as the checkpoint was made; or start a new adapter run from those weights by "
            f"passing {checkpoint} as the model, without resume_from_checkpoint."
        )
    if not adapter and has_adapter and not has_model:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it holds a PEFT adapter (adapter_model.*) but this run trains the full "
            "model (no peft_config). Resume with the peft_config the checkpoint was made with."
        )


def check_resume_settings(saved: dict, current: dict, folder: str) -> None:
    """Compare the settings a checkpoint was made with (`saved`) with this run's (`current`): raise for those in
    `RESUME_MUST_MATCH`, warn for those in `RESUME_SHOULD_MATCH`. Settings the checkpoint did not record are skipped."""
    differ = lambda name: name in saved and saved[name] != current.get(name)  # noqa: E731
    errors = [name for name in RESUME_MUST_MATCH if differ(name)]
    if errors:
        listed = ", ".join(f"{name}={saved[name]!r} there, {current.get(name)!r} here" for name in errors)
        raise ValueError(
            f"Cannot resume from {folder}: it was made with other settings ({listed}). The saved optimizer state, "
            "data position and loss normalisation belong to those settings. Resume with the checkpoint's values, or "
            "start a new run in another output_dir."
        )
    for name in RESUME_SHOULD_MATCH:
        if differ(name):
            warnings.warn(
                f"Resuming from {folder}, which was trained from {name}={saved[name]!r}, with {name}="
                f"{current.get(name)!r}. Fine if it is the same model moved elsewhere; otherwise the checkpoint's "
                "weights do not belong to this model.",
                stacklevel=3,
            )


class NoSpaceLeftError(OSError):
    """Saving stopped because the disk is full; the message names the folder left incomplete."""


def is_disk_full(error: BaseException, folder: str) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(error):  # C++ writers (torch.save, safetensors) wrap the errno in text
        return True
    if isinstance(error, RuntimeError) and "write failed" in str(error):  # torch.save's zip writer
        existing = folder
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        return bool(existing) and shutil.disk_usage(existing).free < 64 * 2**20
    return False


@contextmanager
def explain_full_disk(folder: str | os.PathLike):
    """Turn a full-disk failure while writing `folder` into a `NoSpaceLeftError` that names it and says what to do."""
    folder = os.fspath(folder)
    try:
        yield
    except NoSpaceLeftError:
        raise
    except Exception as error:
        if not is_disk_full(error, folder):
            raise
        raise NoSpaceLeftError(
            errno.ENOSPC,
            f"no space left on device while saving {folder}; it is incomplete (resume_from_checkpoint=True skips "
            "it). Free disk space (delete old checkpoints, or set save_total_limit; save_only_model=True drops the "
            "optimizer state), then resume from the last complete checkpoint.",
        ) from error


def resolve_checkpoint(resume_from_checkpoint, output_dir: str | os.PathLike) -> str | None:
    """The folder to resume from: `True` (or the string "true" a command line gives) means the newest complete
    checkpoint of `output_dir`; a path is used as it is; `False` / None means none."""
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "false"):
        if not os.path.isdir(resume_from_checkpoint):
            resume_from_checkpoint = resume_from_checkpoint.lower() == "true"
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint-N folder. "
                "Train from the start (resume_from_checkpoint=False), or pass a checkpoint folder."
            )
        return checkpoint
    if not resume_from_checkpoint:
        return None
    checkpoint = os.fspath(resume_from_checkpoint)
    reason = incomplete_reason(checkpoint) if os.path.isdir(checkpoint) else "it is not a folder"
    if reason is not None:
        parent = os.path.dirname(os.path.abspath(checkpoint))
        earlier = [
            folder
            for folder in _checkpoint_folders(parent)
            if os.path.abspath(folder) != os.path.abspath(checkpoint) and incomplete_reason(folder) is None
        ]
        fallback = f" The newest complete one there is {earlier[0]}." if earlier else ""
        raise ValueError(
            f"Cannot resume from {checkpoint}: {reason}.{fallback} Resume from a complete checkpoint folder, or with "
            "resume_from_checkpoint=True, which takes the newest complete one of output_dir."
        )
    return checkpoint


def read_state(checkpoint: str | os.PathLike) -> dict:
    """grpo-ext's state saved in a checkpoint; empty for checkpoints written before there was one."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except ValueError as error:
        raise ValueError(
            f"{path} is unreadable ({type(error).__name__}: {error}): the checkpoint {checkpoint} is incomplete or "
            "corrupt. Resume from an earlier checkpoint-N, or with resume_from_checkpoint=True (the newest complete "
            "one)."
        ) from error


def write_state(folder: str | os.PathLike, state: dict) -> None:
    with open(os.path.join(folder, STATE_FILE), "w") as file:
        json.dump(state, file, indent=2)


# --- In a trainer: checkpoints that say what they were made with, and resume that checks it ---


class ResumeMixin:
    """Writes grpo-ext's state into each checkpoint (the run's settings, `_checkpoint_state()`), before transformers'
    files, and restores it on resume (`_restore_checkpoint_state(state)`); a finished run resumed trains nothing.
    Mixed into `GRPOExtTrainer`, which defines those two methods, `_model_path` and `_finite`."""

    def _finished(self, checkpoint: str) -> bool:
        """Whether `checkpoint` is already at `max_steps`: transformers would train one step more before noticing."""
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
        return self.args.max_steps > 0 and state.global_step >= self.args.max_steps

    def _finished_output(self, checkpoint: str) -> TrainOutput:
        """A finished run resumed (a requeued job, say): its weights and state are loaded, nothing is trained."""
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
        self._load_from_checkpoint(checkpoint)
        logger.warning(
            f"{checkpoint} is at step {self.state.global_step} and max_steps={self.args.max_steps}: the run is "
            "finished, so nothing is trained (its weights are loaded). Raise max_steps to train further."
        )
        losses = [entry["train_loss"] for entry in self.state.log_history if "train_loss" in entry]
        return TrainOutput(self.state.global_step, losses[-1] if losses else 0.0, {})

    def _run_settings(self) -> dict:
        """Settings a checkpoint is tied to (checkpoints.RESUME_MUST_MATCH / RESUME_SHOULD_MATCH)."""
        return {
            "num_generations": self.args.num_generations,
            "loss_type": self.args.loss_type,
            "model": self._model_path,
        }

    def _save_checkpoint(self, model, trial):
        """grpo-ext's state first, then transformers' checkpoint, whose trainer_state.json, written last, marks the
        folder complete (`incomplete_reason`)."""
        step = self.state.global_step
        self._finite.check_weights(self.model, self.accelerator, step, f"save checkpoint-{step}")
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        with explain_full_disk(folder):
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                write_state(folder, {"run": self._run_settings(), **self._checkpoint_state()})
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on resume by every backend (DDP, DeepSpeed, FSDP), after the TrainerState is restored.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._restore_checkpoint_state(read_state(checkpoint))
