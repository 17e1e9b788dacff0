"""Tracking: with WANDB_MODE=offline, and with trackio's local database, the run holds the logged metrics and the
completions table."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer()
    args = GRPOExtConfig(
        output_dir="{output_dir}", per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
        max_steps=2, logging_steps=1, bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no",
        report_to=["{tracker}"], run_name="grpo-ext-test", project="grpo-ext-tests", log_completions=True,
        disable_tqdm=True,
    )
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer), digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    """
)
TABLE_COLUMNS = ["step", "prompt", "completion", "digit_fraction_reward", "reward", "advantage"]


def _wandb_history_keys(run_file) -> set[str]:
    """Metric keys of the history records in an offline `.wandb` file: a 7-byte header, then LevelDB-style log
    blocks of 32 KiB whose records (7-byte header: crc, length, type) hold serialized `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, keys, position, pending = run_file.read_bytes(), set(), 7, b""
    while position + 7 <= len(data):
        block_left = 32768 - (position % 32768)
        if block_left < 7:  # block trailer padding
            position += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += block_left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def test_wandb_offline_run_holds_metrics_and_completions(tmp_path):
    pytest.importorskip("wandb")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(output_dir=tmp_path / "out", tracker="wandb") + "import wandb; wandb.finish()\n")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_DISABLED": "false",
           "WANDB_SILENT": "true"}  # fmt: skip
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1 completions:" in result.stdout

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = _wandb_history_keys(next(runs[0].glob("run-*.wandb")))
    for key in ("train/reward", "train/kl", "train/entropy", "train/completions/mean_length", "completions/_type"):
        assert key in logged, (key, sorted(logged))
    tables = sorted((runs[0] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert tables, "no completions table was logged"
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == TABLE_COLUMNS
    assert len(table["data"]) == 8 and all(row[1].endswith("=") for row in table["data"])


def test_trackio_local_run_holds_metrics_and_completions(tmp_path):
    pytest.importorskip("trackio")
    import sqlite3

    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(output_dir=tmp_path / "out", tracker="trackio"))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}  # local only: no Space
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    with sqlite3.connect(tmp_path / "trackio" / "grpo-ext-tests.db") as database:
        logs = [json.loads(row[0]) for row in database.execute("SELECT metrics FROM metrics ORDER BY id")]
    metric_logs = [log for log in logs if "train/reward" in log]
    assert len(metric_logs) == 2  # one per optimizer step (logging_steps=1)
    for key in (
        "train/kl",
        "train/entropy",
        "train/completions/mean_length",
        "train/rewards/digit_fraction_reward/mean",
    ):
        assert all(key in log for log in metric_logs), key
    tables = [log["completions"] for log in logs if "completions" in log]
    assert len(tables) == 2 and all(table["_type"] == "trackio.table" for table in tables)
    rows = tables[-1]["_value"]
    assert len(rows) == 8 and list(rows[0]) == TABLE_COLUMNS and all(row["prompt"].endswith("=") for row in rows)
