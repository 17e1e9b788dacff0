"""Training curves of a GRPO run, drawn from the `trainer_state.json` transformers writes.

`trainer_state.json` is in every checkpoint folder, and in the output folder once `trainer.save_state()` ran. Its
`log_history` holds one dict per logging step with TRL's metric names, so the curves need nothing but that file:
they can be drawn after the run, on another machine, without loading a model.

    python -m grpo_ext.plot OUTPUT_DIR [--out FILE]

matplotlib is optional (`pip install 'grpo-ext[plot]'`): it is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

TRAINER_STATE_NAME = "trainer_state.json"
CURVES_FILE = "training_curves.png"

# One panel per concept: (title, metrics drawn in it). A panel whose metrics were never logged is left out, so a run
# without a KL penalty or without shaping gets no empty axes.
# A name ending in "*" stands for every logged metric it starts.
PANELS = (
    ("Reward", ("reward", "reward_shaped")),
    ("Held-out task metric (greedy pass@1)", ("eval_pass@1/*",)),
    ("KL to the reference", ("kl", "penalty/reward_kl")),
    ("Mean completion length (tokens)", ("completions/mean_length",)),
    ("Entropy (nats per token)", ("entropy",)),
)


def find_trainer_state(output_dir_or_state_json: str | os.PathLike) -> str:
    """The `trainer_state.json` to read: the path itself, the one in the folder, or the latest checkpoint's.

    The fallback to the latest `checkpoint-N` lets the curves of a run still in progress (or killed before
    `save_state()`) be drawn from the same folder the user passed to the trainer.
    """
    path = os.fspath(output_dir_or_state_json)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is neither a {TRAINER_STATE_NAME} file nor a folder.")
    in_folder = os.path.join(path, TRAINER_STATE_NAME)
    if os.path.isfile(in_folder):
        return in_folder
    checkpoints = [
        (int(match.group(1)), name)
        for name in os.listdir(path)
        if (match := re.fullmatch(r"checkpoint-(\d+)", name))
        and os.path.isfile(os.path.join(path, name, TRAINER_STATE_NAME))
    ]
    if checkpoints:
        return os.path.join(path, max(checkpoints)[1], TRAINER_STATE_NAME)
    raise FileNotFoundError(
        f"No {TRAINER_STATE_NAME} in {path} nor in a checkpoint-N folder inside it. transformers writes one in each "
        f"checkpoint; after training, call trainer.save_state() to write it in the output folder."
    )


def load_log_history(output_dir_or_state_json: str | os.PathLike) -> list[dict]:
    """The `log_history` list of a run's `trainer_state.json` (see `find_trainer_state` for where it is looked for)."""
    with open(find_trainer_state(output_dir_or_state_json), encoding="utf-8") as file:
        return json.load(file).get("log_history", [])


def collect_curves(log_history: list[dict]) -> list[tuple[str, dict[str, tuple[list[int], list[float]]]]]:
    """`[(panel title, {metric: (steps, values)})]` for the panels with at least one logged value.

    Evaluation entries carry `eval_`-prefixed names and so are not mixed into the training curves; the task metrics
    of evaluations (`eval_pass@1/<name>`) have their own panel. Values that are not finite numbers (a NaN reward when
    every reward function skipped a batch) are dropped rather than drawn.
    """
    logged = list(dict.fromkeys(key for entry in log_history for key in entry))
    panels = []
    for title, patterns in PANELS:
        curves = {}
        for metric in _expand(patterns, logged):
            points = [
                (entry["step"], float(entry[metric]))
                for entry in log_history
                if "step" in entry and _is_finite_number(entry.get(metric))
            ]
            if points:
                steps, values = zip(*points, strict=True)
                curves[metric] = (list(steps), list(values))
        if curves:
            panels.append((title, curves))
    return panels


def _expand(patterns: tuple[str, ...], logged: list[str]) -> list[str]:
    """The metric names a panel draws: each pattern as it is, or for `prefix*` the logged names that start so."""
    names = []
    for pattern in patterns:
        names += [key for key in logged if key.startswith(pattern[:-1])] if pattern.endswith("*") else [pattern]
    return names


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_training_curves(output_dir_or_state_json: str | os.PathLike, path: str | os.PathLike | None = None) -> str:
    """Draw reward, the held-out task metric, KL, completion length and entropy against the optimizer step into a
    PNG; return its path.

    Args:
        output_dir_or_state_json: a run's output folder, one of its checkpoint folders, or a `trainer_state.json`.
        path: where to write the PNG. Defaults to `training_curves.png` next to the `trainer_state.json` read when a
            file is given, and inside the folder when a folder is given (so `push_adapter_to_hub` finds it).
    """
    source = os.fspath(output_dir_or_state_json)
    panels = collect_curves(load_log_history(source))
    if not panels:
        wanted = [metric for _, metrics in PANELS for metric in metrics]
        raise ValueError(
            f"The log history of {find_trainer_state(source)} has none of {wanted}: nothing to plot. Was the run "
            f"logged (logging_steps smaller than max_steps)?"
        )
    if path is None:
        folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
        path = os.path.join(folder, CURVES_FILE)
    path = os.fspath(path)
    _draw(panels, path)
    return path


def _draw(panels, path: str) -> None:
    """Render with the Agg canvas directly: no pyplot, so the caller's interactive backend and figures are untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'grpo-ext[plot]'") from error

    figure = Figure(figsize=(7.0, 2.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, curves) in zip(axes, panels, strict=True):
        for metric, (steps, values) in curves.items():
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=metric)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_ext.plot", description="Draw a GRPO run's training curves from its trainer_state.json."
    )
    parser.add_argument("output_dir", help="output folder, checkpoint folder, or trainer_state.json of a run")
    parser.add_argument("--out", default=None, help="PNG to write (default: OUTPUT_DIR/training_curves.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_training_curves(args.output_dir, args.out))  # noqa: T201 - the command line's output
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 - the command line's output
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
