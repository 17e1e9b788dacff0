"""The CPU this process runs on: whether it computes bf16 / fp16 natively, the dtype `auto` means on it, and how many
threads torch should use.

Light on purpose (the standard library at import, torch inside the functions): the config, the model loader, the
memory planner and the command-line tools all import it.

Why it exists: on a CPU without native bf16 kernels every bf16 matmul is emulated. `recipes/evaluate.py` with
`--dtype auto` loaded SmolLM2 in its checkpoint's bf16 and spent over 6 minutes on one batch that float32 ran in
seconds. And torch starts one OpenMP thread per core of the machine, not per core this process may use: in a
container or next to another busy process the threads wait on each other, and a step took 2-4 times longer.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

logger = logging.getLogger(__name__)

NUM_THREADS_ENV = "GRPO_EXT_NUM_THREADS"  # the override of `set_torch_threads`
HALF_DTYPES = ("bfloat16", "float16")

# Messages already logged: each is said once per process, not once per model loaded or step.
_SAID: set[str] = set()


def _say_once(level: int, message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.log(level, message)


# --- Half-precision kernels ---


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX), as oneDNN reports it."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def cpu_has_fast_fp16() -> bool:
    """Whether this CPU computes fp16 natively (AVX512-FP16 / AMX-FP16), as oneDNN reports it."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def accelerator_available() -> bool:
    """Whether torch sees a GPU (CUDA / ROCm) or an Apple GPU: without one, everything runs on the CPU."""
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def trains_on_cpu(args) -> bool:
    """Whether a run with these `TrainingArguments` computes on the CPU: `use_cpu`, or no GPU in sight."""
    return bool(args.use_cpu) or not accelerator_available()


def check_cpu_settings(args) -> None:
    """Warn when a config trains in bf16 (TRL's default) on a CPU without native bf16 kernels, where every matmul is
    emulated (run by `settings.check_settings`, at trainer start)."""
    if args.bf16 and trains_on_cpu(args) and not cpu_has_fast_bf16():
        warnings.warn(  # stacklevel 2: the one line that runs every check, so it is shown once per process
            "bf16=True (TRL's default) on a CPU without native bf16 support: training will be several times slower "
            "than in float32. Set bf16=False (--bf16 false) for CPU runs.",
            stacklevel=2,
        )


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def slow_on_this_cpu(dtype) -> bool:
    """Whether `dtype` (a name or a `torch.dtype`) is a half-precision type this CPU has no native kernels for."""
    name = _dtype_name(dtype)
    return (name == "bfloat16" and not cpu_has_fast_bf16()) or (name == "float16" and not cpu_has_fast_fp16())


def auto_is_float32(checkpoint_dtype=None) -> bool:
    """Whether `dtype="auto"` means float32 on this CPU (see `cpu_dtype`; no log line)."""
    checkpoint = _dtype_name(checkpoint_dtype) or "bfloat16"
    return checkpoint in HALF_DTYPES and slow_on_this_cpu(checkpoint)


def cpu_dtype(dtype, checkpoint_dtype=None):
    """The dtype to load a model in on the CPU: `dtype` as given, except `"auto"` (the checkpoint's own dtype) when
    that is a half-precision type this CPU has no native kernels for: then `"float32"`, said once in the log. An
    explicit `"bfloat16"` / `"float16"` (or `torch.dtype`) is kept, with a warning that it will be slow.

    `checkpoint_dtype` is the `dtype` of the checkpoint's config.json; None (not known without downloading it)
    counts as bfloat16, the dtype of nearly every recent checkpoint.
    """
    if dtype == "auto":
        if not auto_is_float32(checkpoint_dtype):
            return dtype
        checkpoint = _dtype_name(checkpoint_dtype)
        if checkpoint:
            message = (
                f"dtype='auto' would load this {checkpoint} checkpoint in {checkpoint}, which this CPU has no native "
                f"kernels for (several times slower than float32): loading in float32 instead. Pass "
                f"dtype='{checkpoint}' (--dtype {checkpoint}) to keep it."
            )
        else:
            message = (
                "dtype='auto' on a CPU without native bf16 kernels: loading in float32, as the checkpoint's dtype is "
                "not known before loading and bf16 would run several times slower. Pass an explicit dtype (--dtype "
                "bfloat16) to choose."
            )
        _say_once(logging.WARNING, message)
        return "float32"
    if slow_on_this_cpu(dtype):
        _say_once(
            logging.WARNING,
            f"dtype={_dtype_name(dtype)!r} on a CPU without native {_dtype_name(dtype)} support: the model will run "
            "several times slower than in float32. Pass dtype='float32' (or --dtype float32) for CPU runs.",
        )
    return dtype


# --- Threads ---


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (`cpu.max`, or cgroup v1's `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), or None when there is none or it cannot be read."""
    try:
        with open(os.path.join(root, "cpu.max")) as file:  # cgroup v2: "max 100000" or "200000 100000"
            quota, period = file.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as file:
            quota = int(file.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as file:
            period = int(file.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may actually run on: its affinity mask (taskset, a container's cpuset), capped by its
    cgroup's CPU quota (docker --cpus), shared with the other processes of a launch on this machine
    (`LOCAL_WORLD_SIZE`, set by torchrun / accelerate)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.floor(quota))  # a fractional core left over would only make threads wait
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_processes))


def num_threads() -> tuple[int, str]:
    """`(threads, why)`: `GRPO_EXT_NUM_THREADS` if set, else an explicit `OMP_NUM_THREADS` (which torch read at
    start), else the usable cores (`usable_cores`)."""
    for name in (NUM_THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"{name}={value!r} must be a whole number of threads >= 1 (e.g. {name}=4), or unset.")
        return threads, f"{name}={threads}"
    return usable_cores(), "the cores this process may use"


def set_torch_threads() -> int:
    """Set torch's intra-op threads to `num_threads()` and say so once; returns the number. For command-line tools
    and recipes, called before any model runs (the library itself never changes the threads of a user's process)."""
    import torch

    threads, why = num_threads()
    torch.set_num_threads(threads)
    _say_once(
        logging.INFO,
        f"torch uses {threads} CPU thread{'s' if threads > 1 else ''} ({why}; override with {NUM_THREADS_ENV}=N).",
    )
    return threads
