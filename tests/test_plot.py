"""Training curves from trainer_state.json: a real PNG drawn by matplotlib, absent metrics skipped, and the CLI."""

import json
import struct
import subprocess
import sys

import pytest

from grpo_ext.plot import collect_curves, find_trainer_state, main, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_state(folder, log_history):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"global_step": len(log_history), "log_history": log_history}))
    return path


def grpo_log(steps=5, with_shaping=True):
    """A log history as GRPOExtTrainer writes it, plus an eval entry and the end-of-training summary."""
    history = []
    for step in range(1, steps + 1):
        entry = {
            "step": step,
            "loss": 0.01,
            "reward": 0.1 * step,
            "rewards/accuracy/mean": 0.1 * step,
            "kl": 0.001 * step,
            "entropy": 2.0 - 0.1 * step,
            "completions/mean_length": 10.0 + step,
        }
        if with_shaping:
            entry |= {"reward_shaped": 0.1 * step - 0.01, "penalty/reward_kl": 0.002 * step}
        history.append(entry)
    history.append({"step": steps, "eval_reward": 0.3, "eval_kl": 0.01})
    history.append({"step": steps, "train_runtime": 1.0, "train_loss": 0.01})
    return history


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which follows the signature and the chunk's length and type."""
    with open(path, "rb") as file:
        data = file.read(24)
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_collect_curves_keeps_logged_metrics_and_skips_absent_panels():
    history = grpo_log(steps=3, with_shaping=False)
    del history[1]["entropy"]  # a metric missing from one entry is a gap, not an error
    history[2]["reward"] = float("nan")
    panels = dict(collect_curves(history))

    assert list(panels) == [
        "Reward",
        "KL to the reference",
        "Mean completion length (tokens)",
        "Entropy (nats per token)",
    ]
    assert panels["Reward"] == {"reward": ([1, 2], pytest.approx([0.1, 0.2]))}  # NaN dropped, no eval_reward
    assert panels["KL to the reference"] == {"kl": ([1, 2, 3], pytest.approx([0.001, 0.002, 0.003]))}
    assert panels["Entropy (nats per token)"] == {"entropy": ([1, 3], pytest.approx([1.9, 1.7]))}

    only_reward = collect_curves([{"step": 1, "reward": 0.5}, {"step": 2, "loss": 0.1}])
    assert only_reward == [("Reward", {"reward": ([1], [0.5])})]


def test_plot_writes_a_matplotlib_png_in_the_output_dir(tmp_path):
    pytest.importorskip("matplotlib")
    write_state(tmp_path, grpo_log())

    path = plot_training_curves(tmp_path)

    assert path == str(tmp_path / "training_curves.png")
    with open(path, "rb") as file:
        data = file.read()
    assert data[:8] == PNG_SIGNATURE
    assert b"Matplotlib" in data  # matplotlib's "Software" text chunk: drawn by matplotlib, not copied
    width, height = png_size(path)
    assert (width, height) == (700, 4 * 240)  # 7 x (2.4 per panel) inches at 100 dpi, four panels


def test_absent_metrics_give_fewer_panels(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"step": s, "reward": 0.1 * s, "completions/mean_length": 5.0 + s} for s in (1, 2, 3)]
    write_state(tmp_path, history)

    path = plot_training_curves(tmp_path / "trainer_state.json", tmp_path / "figures" / "curves.png")

    assert path == str(tmp_path / "figures" / "curves.png")
    assert png_size(path) == (700, 2 * 240)  # reward and length only: no KL or entropy panels


def test_reads_latest_checkpoint_when_output_dir_has_no_state(tmp_path):
    write_state(tmp_path / "checkpoint-2", [{"step": 2, "reward": 0.2}])
    write_state(tmp_path / "checkpoint-10", [{"step": 10, "reward": 1.0}])
    assert find_trainer_state(tmp_path) == str(tmp_path / "checkpoint-10" / "trainer_state.json")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="save_state"):
        plot_training_curves(empty)


def test_nothing_to_plot_is_an_error(tmp_path):
    write_state(tmp_path, [{"step": 1, "loss": 0.3}])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves(tmp_path)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    write_state(tmp_path, grpo_log())
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` of a module mapped to None raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'grpo-ext\[plot\]'"):
        plot_training_curves(tmp_path)
    assert not (tmp_path / "training_curves.png").exists()


def test_cli_prints_the_written_path(tmp_path):
    """One real `python -m` run (the package import dominates its time); error paths are tested in-process."""
    pytest.importorskip("matplotlib")
    write_state(tmp_path, grpo_log())
    out = tmp_path / "cli.png"

    result = subprocess.run(
        [sys.executable, "-m", "grpo_ext.plot", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_reports_a_missing_run_without_a_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 1
    assert "neither a trainer_state.json file nor a folder" in capsys.readouterr().err
