"""The pre-flight check (grpo_ext.doctor): each signal named with its numbers, on rollouts of tiny models and on plain
tensors; the verdict; the CLI's exit codes; `doctor_steps` in a training run."""

import logging
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_trainer

from grpo_ext.doctor import (
    BLOCKING,
    INFO,
    WARNING,
    RolloutSample,
    RunSettings,
    check_learning_rate,
    check_memory,
    correlation,
    diagnose,
    main,
    preflight,
    run_settings,
    sample_rollouts,
)
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, save_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pays_anything(completions, **kwargs):
    """1.0 for any completion: a reward for nothing at all."""
    return [1.0] * len(completions)


def constant_reward(completions, **kwargs):
    return [0.5] * len(completions)


def only(report, check):
    findings = report.of(check)
    assert len(findings) == 1, findings
    return findings[0]


# --- Signals from rollouts of a tiny model ---


def test_every_completion_cut_is_blocking_with_its_numbers(tokenizer, make_args):
    # min_new_tokens = max_completion_length: the stop token is suppressed to the last position, so all are cut
    args = make_args(max_completion_length=5, generation_kwargs={"min_new_tokens": 5})
    trainer = tiny_trainer(tokenizer, args)
    trainer.model.eval()
    rng_state = torch.random.get_rng_state()
    report = preflight(trainer, steps=2)
    # nothing changed: the model's mode and the random state are as they were
    assert not trainer.model.training and torch.equal(torch.random.get_rng_state(), rng_state)
    # 2 batches x (8 completions = 2 prompts x G=4)
    assert report.header.startswith("16 completions (4 prompts x 4)")
    cut = only(report, "truncation")
    assert cut.severity == BLOCKING
    assert cut.numbers == {"truncated": 16, "completions": 16, "share": 1.0, "max_completion_length": 5}
    assert "16 of 16 completions (100%) are cut at max_completion_length=5" in cut.what
    assert "raise max_completion_length (now 5)" in cut.fix
    assert not report.ready and report.verdict.startswith("will not learn because 16 of 16 completions (100%)")
    # the stop tokens in use, decoded
    assert only(report, "stop_tokens").what == "stop tokens: '<|im_end|>' (id 3)"


def test_a_constant_reward_gives_zero_spread_groups(tokenizer, make_args):
    trainer = tiny_trainer(tokenizer, make_args(), reward_funcs=constant_reward)
    report = preflight(trainer, steps=2)
    flat = only(report, "zero_spread")
    assert flat.severity == BLOCKING
    assert flat.numbers == {"zero_spread_groups": 4, "groups": 4, "share": 1.0}
    assert "4 of 4 groups (100%) have zero reward spread (4 all 0.50)" in flat.what
    assert "dynamic_sampling=True" in flat.fix and "num_generations (now 4)" in flat.fix
    reward = only(report, "reward")
    assert reward.severity == WARNING and reward.numbers["mean"] == 0.5 and reward.numbers["std"] == 0.0
    assert "zero reward spread" in report.verdict and "dynamic_sampling=True" in report.verdict


def test_a_reward_paying_on_wrong_completions_is_named(tokenizer, make_args):
    # answer_line (the task metric) checks the `answer` column: the untrained model never writes "Answer: <sum>"
    args = make_args(eval_reward_funcs=["answer_line"])
    trainer = tiny_trainer(tokenizer, args, reward_funcs=[pays_anything, digit_fraction_reward])
    sample = sample_rollouts(trainer, steps=1)  # what preflight does: sample, then diagnose
    assert sample.task_names == ["answer_line"] and sample.task_scores.eq(0.0).all()
    report = diagnose(sample, run_settings(trainer))
    surface = {finding.numbers["name"]: finding for finding in report.of("surface_reward")}
    paid = surface["pays_anything"]
    assert paid.severity == WARNING
    assert paid.numbers["paid_on_wrong"] == paid.numbers["wrong"] == 8 and paid.numbers["share"] == 1.0
    assert paid.numbers["mean_on_wrong"] == 1.0
    assert "reward pays_anything pays on 8 of 8 completions (100%) that answer_line marks wrong" in paid.what
    assert "surface feature alone, e.g. " in paid.what and "gate pays_anything on answer_line" in paid.fix
    # the digit reward pays on the completions holding a digit: with no right completion to pay more, it is named too
    digits = surface["digit_fraction_reward"]
    with_digits = sum(any(ch.isdigit() for ch in text) for text in sample.texts)
    assert digits.numbers["paid_on_wrong"] == with_digits
    assert digits.severity == (WARNING if with_digits else INFO)
    # pays_anything never varies: named, and its correlation with the other is undefined
    assert only(report, "correlation").what == "reward correlations: pays_anything~digit_fraction_reward n/a"


def test_no_task_metrics_skips_the_surface_check_with_a_note(tokenizer, make_args):
    report = preflight(tiny_trainer(tokenizer, make_args(), reward_funcs=pays_anything), steps=1)
    note = only(report, "surface_reward")
    assert note.severity == INFO and "not checked (no task metrics: set eval_reward_funcs" in note.what


def test_a_lora_learning_rate_far_too_low_is_blocking(tokenizer, make_args):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = tiny_trainer(tokenizer, make_args(learning_rate=1e-7), peft_config=lora)
    report = preflight(trainer, steps=1)
    rate = only(report, "learning_rate")
    assert rate.severity == BLOCKING and rate.numbers == {"learning_rate": 1e-7}
    assert rate.what == (
        "learning_rate=1e-07 with LoRA is 100x below the typical LoRA GRPO range 1e-05 to 0.0002: the adapter will "
        "barely move"
    )
    assert "set learning_rate to 1e-05..0.0002" in rate.fix
    assert "learning_rate=1e-07 with LoRA" in report.verdict


def test_full_fine_tuning_above_1e_4_is_a_warning_and_the_memory_verdict(tokenizer, make_args):
    from grpo_ext.plan import plan_step, run_step_inputs

    trainer = tiny_trainer(tokenizer, make_args(learning_rate=1e-3))
    (rate,) = check_learning_rate(run_settings(trainer))
    assert rate.severity == WARNING and "learning_rate=0.001 for full fine-tuning is above 0.0001" in rate.what
    # the memory planner's verdict on this run, with a budget a byte short of its predicted peak, and one that fits
    peak = plan_step(*run_step_inputs(trainer.args, trainer.model.config)).peak
    (memory,) = check_memory(run_settings(trainer, gpu_memory=f"{peak - 1}B"))
    assert memory.severity == WARNING and memory.numbers == {"peak": peak, "budget": peak - 1}
    assert "does not fit" in memory.what and "python -m grpo_ext.plan" in memory.fix
    assert check_memory(run_settings(trainer, gpu_memory="1GiB"))[0].severity == INFO
    assert check_memory(run_settings(trainer)) == []  # no budget: not checked


# --- The pure part, on plain tensors ---


def sample_of(rewards, G=4, truncated=None, task_scores=None):
    rewards = torch.tensor(rewards, dtype=torch.float32).view(len(rewards), -1)  # (N, K)
    n = rewards.size(0)
    return RolloutSample(
        reward_names=[f"r{k}" for k in range(rewards.size(1))],
        rewards=rewards,
        total=rewards.nansum(dim=1),
        num_generations=G,
        truncated=truncated or [False] * n,
        max_completion_length=32,
        texts=[f"completion {i}" for i in range(n)],
        task_names=["correct"] if task_scores is not None else [],
        task_scores=None if task_scores is None else torch.tensor(task_scores, dtype=torch.float32).view(n, -1),
    )


LORA = RunSettings(learning_rate=1e-4, finetuning="lora", stop_tokens=[(3, "<|im_end|>")])


def test_a_healthy_setup_is_ready():
    correct = [0, 1, 0, 0, 1, 1, 0, 1]  # each group of 4 has right and wrong answers
    report = diagnose(sample_of(correct, task_scores=correct), LORA)
    assert report.ready and report.verdict == "ready" and not report.needs_attention
    assert report.text().endswith("verdict: ready")
    assert only(report, "zero_spread").numbers == {"zero_spread_groups": 0, "groups": 2, "share": 0.0}
    assert only(report, "truncation").severity == INFO
    reward = only(report, "reward").numbers
    assert reward["mean"] == 0.5 and reward["std"] == pytest.approx(0.5345, abs=1e-4)  # Bessel std of four 0s, 1s
    assert only(report, "surface_reward").numbers["paid_on_wrong"] == 0
    assert only(report, "learning_rate").severity == INFO


def test_thresholds_of_truncation_and_zero_spread():
    rewards = [0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1]  # 1 of 4 groups flat: 25%, not above the warning line
    two_cut = [True, True] + [False] * 14  # 12.5%: a warning
    report = diagnose(sample_of(rewards, truncated=two_cut), LORA)
    assert only(report, "truncation").severity == WARNING and only(report, "truncation").numbers["share"] == 0.125
    assert only(report, "zero_spread").severity == INFO
    assert "1 of 4 groups (25%) have zero reward spread (1 all 0.00)" in only(report, "zero_spread").what
    three_flat = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
    flat = only(diagnose(sample_of(three_flat), LORA), "zero_spread")
    assert flat.severity == BLOCKING and "3 of 4 groups (75%)" in flat.what and "(2 all 0.00, 1 all 1.00)" in flat.what
    # dynamic sampling resamples flat groups: a warning with the rollouts it will take, blocking only if none varies
    dynamic = RunSettings(learning_rate=1e-4, finetuning="lora", dynamic_sampling=True)
    resampled = only(diagnose(sample_of(three_flat), dynamic), "zero_spread")
    assert resampled.severity == WARNING and "about 4.0 rollouts per step" in resampled.fix
    assert only(diagnose(sample_of([1.0] * 8), dynamic), "zero_spread").severity == BLOCKING


def test_a_reward_paying_right_answers_clearly_more_is_not_surface_only():
    correct = [1, 0, 0, 0, 1, 1, 0, 0]
    tracks = [1, 0.2, 0, 0, 1, 1, 0, 0]  # pays a little on one wrong answer, much more on right ones: 1.00 vs 0.04
    form = [1, 1, 0, 0, 0, 1, 1, 0]  # pays 2 of 5 wrong and 2 of 3 right: 0.67 - 0.40 < half its range
    blind = [1, 1, 1, 0, 0, 0, 1, 0]  # pays 3 of 5 wrong and 1 of 3 right
    report = diagnose(sample_of(list(zip(tracks, form, blind)), task_scores=correct), LORA)
    r0, r1, r2 = report.of("surface_reward")
    assert (r0.severity, r0.numbers["paid_on_wrong"], r0.numbers["wrong"]) == (INFO, 1, 5)
    assert r0.numbers["mean_on_wrong"] == pytest.approx(0.04) and r0.numbers["mean_on_right"] == 1.0
    assert (r1.severity, r1.numbers["paid_on_wrong"], r1.numbers["share"]) == (WARNING, 2, 0.4)
    assert "(mean 0.40 on them, 0.67 on right ones): it pays for a surface feature alone" in r1.what
    assert (r2.severity, r2.numbers["paid_on_wrong"], r2.numbers["share"]) == (WARNING, 3, 0.6)
    assert (
        "(mean 0.60 on them, 0.33 on right ones): it pays for a surface feature alone, e.g. 'completion 1'" in r2.what
    )


def test_none_rewards_and_correlation():
    nan = float("nan")
    report = diagnose(sample_of([[1, 0], [0, 1], [1, nan], [0, 1], [1, 0], [0, 1], [1, 0], [0, nan]]), LORA)
    first, second = report.of("reward")
    assert second.numbers["none_share"] == 0.25 and "None on 25% of completions" in second.what
    assert only(report, "correlation").numbers == {"r0~r1": pytest.approx(-1.0)}
    assert correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(0.9934, abs=1e-4)
    all_none = diagnose(sample_of([nan] * 4), LORA).of("reward")[0]
    assert all_none.severity == WARNING and "returned None for all 4 completions" in all_none.what


def test_bf16_on_a_slow_cpu_and_learning_rate_ranges():
    slow = RunSettings(learning_rate=1e-4, finetuning="lora", bf16=True, on_cpu=True, cpu_fast_bf16=False)
    assert only(diagnose(sample_of([0, 1, 0, 1]), slow), "bf16").fix == "set bf16=False (--bf16 false) for CPU runs"
    fast = RunSettings(learning_rate=1e-4, finetuning="lora", bf16=True, on_cpu=True, cpu_fast_bf16=True)
    assert diagnose(sample_of([0, 1, 0, 1]), fast).of("bf16") == []
    severity = {
        lr: only(diagnose(sample_of([0, 1, 0, 1]), RunSettings(lr, "lora")), "learning_rate").severity
        for lr in (1e-6, 5e-6, 1e-5, 2e-4, 8e-4, 2e-3)
    }
    assert severity == {1e-6: BLOCKING, 5e-6: WARNING, 1e-5: INFO, 2e-4: INFO, 8e-4: INFO, 2e-3: WARNING}


def test_doctor_steps_must_not_be_negative(make_args):
    with pytest.raises(ValueError, match="doctor_steps=-1 must be >= 0"):
        make_args(doctor_steps=-1)


# --- In a training run ---


def test_doctor_steps_logs_the_verdict_and_leaves_the_run_unchanged(tokenizer, make_args, caplog, tmp_path):
    def trained(doctor_steps):
        args = make_args(doctor_steps=doctor_steps, max_steps=1, output_dir=str(tmp_path / f"out{doctor_steps}"))
        trainer = tiny_trainer(tokenizer, args)
        trainer.train()
        return trainer

    with caplog.at_level(logging.INFO, logger="grpo_ext.doctor"):
        checked = trained(1)
    reports = [record for record in caplog.records if record.getMessage().startswith("pre-flight check:")]
    assert len(reports) == 1
    report = reports[0].getMessage()
    assert report.startswith("pre-flight check: 8 completions (2 prompts x 4)")  # 1 batch: 2 prompts x G=4
    assert "learning_rate=0.001 for full fine-tuning is above 0.0001" in report
    assert "\nverdict: " in report
    assert reports[0].levelno == logging.WARNING  # something needs a look (here the learning rate)
    # no gradient, nothing stepped, the random state restored: the same weights as a run without the check
    unchecked = trained(0)
    for (name, checked_weight), unchecked_weight in zip(checked.model.named_parameters(), unchecked.model.parameters()):
        assert torch.equal(checked_weight, unchecked_weight), name
    assert not torch.equal(checked.model.lm_head.weight, tiny_trainer(tokenizer, make_args()).model.lm_head.weight)


# --- The command line ---


def _write_tiny_recipe(tmp_path, **overrides):
    """A recipe YAML on a tiny model saved to disk and a few sums (the recipe's loading path, in seconds)."""
    save_tiny_model(tmp_path / "model")
    make_prompt_dataset(8).to_json(tmp_path / "train.jsonl")
    config = dict(
        model_name_or_path=str(tmp_path / "model"),
        dtype="float32",
        dataset_name=str(tmp_path / "train.jsonl"),
        dataset_config=None,
        dataset_test_split=None,
        instruction="",
        conversational=False,
        reward_funcs=["grpo_ext.testing:digit_fraction_reward"],
        use_peft=True,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=1e-7,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        generation_kwargs={"min_new_tokens": 5},
        output_dir=str(tmp_path / "out"),
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        seed=0,
    )
    config.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_exit_codes_on_a_tiny_recipe(tmp_path, capsys):
    config = _write_tiny_recipe(tmp_path)
    assert main(["--config", str(config), "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "pre-flight check: 8 completions (2 prompts x 4)" in out
    assert "  - 8 of 8 completions (100%) are cut at max_completion_length=5" in out
    assert "  - learning_rate=1e-07 with LoRA is 100x below" in out
    # a command-line override of the recipe, as for recipes/deepseek_math_style.py
    assert main(["--config", str(config), "--steps", "1", "--max_completion_length", "3"]) == 1
    assert "cut at max_completion_length=3" in capsys.readouterr().out
    # usage errors: 2, the argument named
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--gpu-memory", "lots"])
    assert exit_info.value.code == 2 and "--gpu-memory" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_the_tiny_demo_ready_and_not(tmp_path):
    """The demo's base model (warmed up as `make demo` does: ~30% of held-out sums right) is ready to learn; the same
    run with a LoRA learning rate of 1e-7 is not. Through `python -m grpo_ext.doctor`, as a user runs it."""

    def run(*args):
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)

    prepared = run(ROOT / "recipes" / "prepare_demo.py", tmp_path / "demo")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    demo = [
        "--config", ROOT / "recipes" / "configs" / "tiny-cpu.yaml",
        "--model_name_or_path", tmp_path / "demo" / "base-model",
        "--dataset_name", tmp_path / "demo" / "data" / "train.jsonl",
        "--dataset_test_name", tmp_path / "demo" / "data" / "test.jsonl",
        "--output_dir", tmp_path / "out",
        "--steps", "1",
    ]  # fmt: skip
    ready = run("-m", "grpo_ext.doctor", *demo)
    assert ready.returncode == 0, ready.stdout + ready.stderr[-3000:]
    assert ready.stdout.rstrip().endswith("verdict: ready")
    assert "pre-flight check: 32 completions (4 prompts x 8)" in ready.stdout
    too_low = run("-m", "grpo_ext.doctor", *demo, "--learning_rate", "1e-7")
    assert too_low.returncode == 1, too_low.stdout + too_low.stderr[-3000:]
    assert "verdict: will not learn because\n  - learning_rate=1e-07 with LoRA is 100x below" in too_low.stdout
