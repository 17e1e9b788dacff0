"""The completions table of `log_completions`: one row per completion of the last rollout (step, prompt, completion,
each reward function's reward, the weighted reward, the advantage).

Where it goes, as in TRL: a few rows printed; every row written to `output_dir/completions/completions_<step>.parquet`
at each logging step (what `log_completions_hub_repo` uploads, hub.py); the table logged to wandb / trackio, with
each prompt shown once (its first completion) under `log_unique_prompts`.
"""

from __future__ import annotations

import os

COMPLETIONS_FOLDER = "completions"  # inside output_dir


def table_rows(samples: dict[str, list], unique_prompts: bool = False) -> list[tuple]:
    """The rows of the table (values in the order of `samples`' columns); with `unique_prompts`, only the first row of
    each prompt (prompts compared by their text, as TRL compares conversations)."""
    rows = list(zip(*samples.values(), strict=True))
    if not unique_prompts:
        return rows
    prompt_column, seen, kept = list(samples).index("prompt"), set(), []
    for row in rows:
        prompt = str(row[prompt_column])
        if prompt not in seen:
            seen.add(prompt)
            kept.append(row)
    return kept


def completions_folder(output_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(output_dir), COMPLETIONS_FOLDER)


def parquet_path(output_dir: str | os.PathLike, step: int) -> str:
    """`output_dir/completions/completions_<step, 5 digits>.parquet`."""
    return os.path.join(completions_folder(output_dir), f"completions_{step:05d}.parquet")


def write_parquet(samples: dict[str, list], output_dir: str | os.PathLike, step: int) -> str:
    """Every row of the table as `parquet_path(output_dir, step)`; returns the path."""
    import pandas as pd  # installed with datasets

    path = parquet_path(output_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(samples).to_parquet(path)
    return path


def log_completions_table(samples: dict[str, list], args, step: int, reward_names: list[str], guard) -> None:
    """Print a few of the last rollout's completions (`num_completions_to_print`), write the whole table as this
    step's parquet file (uploaded with `log_completions_hub_repo`), and send it to wandb / trackio if they run. A
    write or a tracker that fails is a warning (`guard`, a `reporting.LoggingGuard`): logging never ends a run."""
    files = f"the completions files ({os.path.dirname(parquet_path(args.output_dir, step))})"
    guard.run(files, lambda: write_parquet(samples, args.output_dir, step))
    rows = table_rows(samples, unique_prompts=args.log_unique_prompts)
    fixed = {"step", "prompt", "completion", "reward", "advantage", *reward_names}
    extra = [column for column in samples if column not in fixed]  # columns logged with log_extra
    lines = [f"step {step} completions:"]
    lines += [
        f"  reward {samples['reward'][i]:+.3f} advantage {samples['advantage'][i]:+.2f} | "
        f"{samples['prompt'][i]!r} -> {samples['completion'][i]!r}"
        + "".join(f" | {column}={samples[column][i]!r}" for column in extra)
        for i in range(len(rows))[: args.num_completions_to_print]
    ]
    print("\n".join(lines))  # noqa: T201 - on the console as TRL prints it, whatever the logging level
    if "wandb" in args.report_to:
        import wandb

        if wandb.run is not None:
            table = lambda: wandb.log({"completions": wandb.Table(columns=list(samples), data=rows)}, step=step)  # noqa: E731
            guard.run("wandb (the completions table)", table)
    if "trackio" in args.report_to:
        import trackio

        table = lambda: trackio.log({"completions": trackio.Table(columns=list(samples), data=rows)}, step=step)  # noqa: E731
        guard.run("trackio (the completions table)", table)
