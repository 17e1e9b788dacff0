"""Tracking: with WANDB_MODE=offline, the run's files hold the logged metrics and the completions table."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import wandb
    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer()
    args = GRPOExtConfig(
        output_dir="{output_dir}", per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
        max_steps=2, logging_steps=1, bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no",
        report_to=["wandb"], run_name="grpo-ext-test", log_completions=True, disable_tqdm=True,
    )
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2", tokenizer), digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    wandb.finish()
    """
)


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
    script.write_text(SCRIPT.format(output_dir=tmp_path / "out"))
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
    assert table["columns"] == ["step", "prompt", "completion", "digit_fraction_reward", "reward", "advantage"]
    assert len(table["data"]) == 8 and all(row[1].endswith("=") for row in table["data"])
