"""completions.py: the completions table's rows (each prompt once with `log_unique_prompts`), as the trainer sends
them to wandb, and the parquet file of each logging step. The Hub upload of those files is in tests/test_hub.py."""

import sys
import types

import pandas as pd
import pytest
from conftest import tiny_trainer

from grpo_ext.completions import log_completions_table, table_rows, write_parquet
from grpo_ext.reporting import LoggingGuard

SAMPLES = {
    "step": [3, 3, 3, 3],
    "prompt": ["a?", "a?", "b?", "b?"],
    "completion": ["1", "2", "3", "4"],
    "reward": [0.0, 1.0, 0.5, 0.25],
    "advantage": [-0.7, 0.7, 0.7, -0.7],
}


def test_table_rows_all_or_each_prompt_once():
    assert table_rows(SAMPLES) == [(3, "a?", "1", 0.0, -0.7), (3, "a?", "2", 1.0, 0.7), (3, "b?", "3", 0.5, 0.7),
                                   (3, "b?", "4", 0.25, -0.7)]  # fmt: skip
    assert table_rows(SAMPLES, unique_prompts=True) == [(3, "a?", "1", 0.0, -0.7), (3, "b?", "3", 0.5, 0.7)]
    conversations = {**SAMPLES, "prompt": [[{"role": "user", "content": p}] for p in SAMPLES["prompt"]]}
    assert [row[2] for row in table_rows(conversations, unique_prompts=True)] == ["1", "3"]  # compared as text


def test_write_parquet_holds_every_row(tmp_path):
    path = write_parquet(SAMPLES, tmp_path, step=3)
    assert path == str(tmp_path / "completions" / "completions_00003.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), pd.DataFrame(SAMPLES))


@pytest.mark.parametrize("unique", [False, True])
def test_trainer_logs_each_prompt_once_to_wandb_and_every_row_to_parquet(tokenizer, make_args, monkeypatch, unique):
    logged = []
    fake_wandb = types.SimpleNamespace(
        run=object(), log=lambda data, step: logged.append((data, step)), Table=lambda columns, data: (columns, data)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    args = make_args(log_completions=True, log_unique_prompts=unique, num_completions_to_print=1)
    trainer = tiny_trainer(tokenizer, args)
    trainer.args.report_to = ["wandb"]  # after Trainer set up its callbacks: only the table goes to the fake wandb
    log_completions_table(SAMPLES, trainer.args, 3, trainer.rewards.names, LoggingGuard())
    ((data, step),) = logged
    columns, rows = data["completions"]
    assert step == 3 and columns == list(SAMPLES)
    assert rows == table_rows(SAMPLES, unique_prompts=unique) and len(rows) == (2 if unique else 4)
    written = pd.read_parquet(f"{args.output_dir}/completions/completions_00003.parquet")
    pd.testing.assert_frame_equal(written, pd.DataFrame(SAMPLES))  # every row, whatever the wandb table shows
