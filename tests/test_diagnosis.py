"""The run doctor's live diagnosis: sequences of logs that fire each signal (its doctor/* values, its one warning
with the numbers and the step), sequences that must not, and a short run whose groups all have zero reward spread."""

import logging

import pytest
from conftest import tiny_trainer

from grpo_ext.diagnosis import DoctorThresholds, RunDiagnosis

TASK = "eval_pass@1/answer_line"


def observe_all(doctor, logs_by_step, mode="train", signal=None):
    """Feed `{step: logs}` in order; the doctor/* metrics returned at each step (or the one `signal`'s values)."""
    found = [doctor.observe(logs, step, mode) for step, logs in logs_by_step.items()]
    return [metrics.get(f"doctor/{signal}") for metrics in found] if signal else found


def doctor_warnings(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "grpo_ext.diagnosis"]


@pytest.fixture(autouse=True)
def _capture_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="grpo_ext.diagnosis")


def test_thresholds_default_to_the_config_defaults(make_args):
    assert DoctorThresholds.from_config(make_args()) == DoctorThresholds()
    custom = DoctorThresholds.from_config(make_args(doctor_patience=3, doctor_kl_threshold=0.5))
    assert (custom.patience, custom.kl_threshold) == (3, 0.5)


def test_only_signals_whose_metric_is_logged_are_returned():
    doctor = RunDiagnosis()
    assert doctor.observe({"learning_rate": 1e-3, "epoch": 0.1}, 1) == {}
    assert doctor.observe({"eval_entropy": 0.0, "eval_loss": 0.0}, 1, "eval") == {}  # train signals read train logs
    assert set(doctor.observe({"loss": 0.5, "entropy": 2.0, "kl": 0.01}, 2)) == {
        "doctor/loss_zero",
        "doctor/entropy_collapse",
        "doctor/kl_explosion",
    }


# --- (a) reward hacking ---


def _evaluations(doctor, rewards_and_tasks):
    """Two train logs before each evaluation (mean reward = the given one), then the evaluation; its flags."""
    flags = []
    for step, (reward, task) in zip(range(10, 10 * (len(rewards_and_tasks) + 1), 10), rewards_and_tasks):
        doctor.observe({"reward": reward - 0.05, "loss": 0.01}, step - 5)
        doctor.observe({"reward": reward + 0.05, "loss": 0.01}, step)
        eval_logs = {"eval_loss": 0.0, "eval_reward": 0.1, TASK: task, "eval_pass@1/format": 1.0}
        flags.append(doctor.observe(eval_logs, step, "eval")["doctor/reward_hacking"])
    return flags


def test_reward_rising_while_the_task_metric_falls_is_reward_hacking(caplog):
    doctor = RunDiagnosis()
    flags = _evaluations(doctor, [(0.2, 0.5), (0.4, 0.45), (0.6, 0.4), (0.8, 0.3)])
    assert flags == [0.0, 0.0, 1.0, 1.0]  # compared from the 2nd evaluation on; 2 in a row fire
    (message,) = doctor_warnings(caplog)  # said once, though the 4th evaluation fits too
    assert "the mean training reward rose while eval_pass@1/answer_line fell on 2 evaluations in a row" in message
    assert "step 10 -> 20: reward 0.2 -> 0.4, eval_pass@1/answer_line 0.5 -> 0.45" in message
    assert "step 20 -> 30: reward 0.4 -> 0.6, eval_pass@1/answer_line 0.45 -> 0.4" in message
    assert "log_completions=True" in message and "metric_for_best_model='eval_pass@1/answer_line'" in message


@pytest.mark.parametrize(
    "rewards_and_tasks",
    [
        [(0.2, 0.5), (0.4, 0.55), (0.6, 0.6)],  # both rise: learning
        [(0.2, 0.5), (0.4, 0.45), (0.6, 0.5), (0.8, 0.45)],  # falls, but not twice in a row
        [(0.6, 0.5), (0.4, 0.45), (0.2, 0.4)],  # both fall: not hacking
    ],
)
def test_no_reward_hacking_without_the_pattern(caplog, rewards_and_tasks):
    assert set(_evaluations(RunDiagnosis(), rewards_and_tasks)) == {0.0}
    assert doctor_warnings(caplog) == []


def test_the_task_metric_follows_metric_for_best_model(make_args, caplog):
    doctor = RunDiagnosis.from_config(make_args(metric_for_best_model="pass@1/format"))
    assert (doctor.task_metric, doctor.greater_is_better) == ("eval_pass@1/format", True)
    assert _evaluations(doctor, [(0.2, 0.5), (0.4, 0.45), (0.6, 0.4)]) == [0.0, 0.0, 0.0]  # format stayed at 1.0
    # the eval loss (transformers' default with load_best_model_at_end) is ~0 by design in GRPO: pass@1 is used
    doctor = RunDiagnosis.from_config(make_args(metric_for_best_model="loss"))
    assert doctor.task_metric is None
    assert _evaluations(doctor, [(0.2, 0.5), (0.4, 0.45), (0.6, 0.4)]) == [0.0, 0.0, 1.0]
    assert doctor.task_metric == TASK  # the first eval_pass@1/ key logged
    # a metric where lower is better: a rise is the fall
    doctor = RunDiagnosis(task_metric="eval_error_rate", greater_is_better=False)
    for step, (reward, error) in enumerate([(0.2, 0.1), (0.4, 0.2), (0.6, 0.3)], start=1):
        doctor.observe({"reward": reward}, step)
        flag = doctor.observe({"eval_error_rate": error}, step, "eval")["doctor/reward_hacking"]
    assert flag == 1.0


# --- (b) groups without reward spread ---


def test_zero_spread_groups_for_patience_logs(caplog):
    doctor = RunDiagnosis()
    logs = {step: {"frac_reward_zero_std": value, "reward": 0.0} for step, value in enumerate([1.0, 0.5], start=1)}
    logs |= {step: {"frac_reward_zero_std": value, "reward": 0.0} for step, value in zip(range(3, 9), [1.0, 0.95] * 3)}
    flags = observe_all(doctor, logs, signal="zero_std")
    assert flags == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # the 0.5 at step 2 restarted the count
    (message,) = doctor_warnings(caplog)
    assert "frac_reward_zero_std was between 0.95 and 1 on the 5 logs of steps 3 to 7 (last 1)" in message
    assert "doctor_zero_std_threshold=0.9" in message and "mean reward 0" in message
    assert "dynamic_sampling=True" in message and "num_generations" in message


# --- (c) entropy collapse ---


def test_entropy_collapse_below_a_tenth_of_its_first_value(caplog):
    doctor = RunDiagnosis(DoctorThresholds(patience=3))
    healthy = observe_all(
        doctor, {1: {"entropy": 2.0}, 2: {"entropy": 1.5}, 3: {"entropy": 1.0}}, signal="entropy_collapse"
    )
    assert healthy == [0.0, 0.0, 0.0] and doctor_warnings(caplog) == []
    collapsed = {step: {"entropy": value} for step, value in zip(range(4, 8), [0.15, 0.12, 0.1, 0.08])}
    assert observe_all(doctor, collapsed, signal="entropy_collapse") == [0.0, 0.0, 1.0, 1.0]
    (message,) = doctor_warnings(caplog)
    assert "entropy (nats per token) was between 0.1 and 0.15 on the 3 logs of steps 4 to 6 (last 0.1)" in message
    assert "(first logged: 2 at step 1)" in message and "doctor_entropy_drop=0.1" in message
    assert "temperature" in message and "entropy_coef" in message


def test_entropy_below_the_floor(caplog):
    doctor = RunDiagnosis(DoctorThresholds(patience=2))
    flags = observe_all(
        doctor, {1: {"entropy": 0.3}, 2: {"entropy": 0.04}, 3: {"entropy": 0.02}}, signal="entropy_collapse"
    )
    assert flags == [0.0, 0.0, 1.0]  # 0.04 is above a tenth of 0.3 but below the 0.05 floor
    assert (
        "entropy (nats per token) was between 0.02 and 0.04 on the 2 logs of steps 2 to 3" in doctor_warnings(caplog)[0]
    )


# --- (d) KL explosion ---


def test_kl_above_the_threshold(caplog):
    doctor = RunDiagnosis(beta=0.04)
    flags = observe_all(
        doctor, {1: {"kl": 0.0}, 2: {"kl": 0.01}, 3: {"kl": 1.5}, 4: {"kl": 2.0}}, signal="kl_explosion"
    )
    assert flags == [0.0, 0.0, 1.0, 1.0]
    (message,) = doctor_warnings(caplog)
    assert "kl (mean per-token KL to the reference) is 1.5 at step 3, above doctor_kl_threshold=1.0" in message
    assert "larger beta (now 0.04)" in message


def test_kl_growing_tenfold_over_patience_logs(caplog):
    doctor = RunDiagnosis(DoctorThresholds(patience=5))
    values = [0.06, 0.1, 0.2, 0.4, 0.6, 0.7]
    flags = observe_all(doctor, {step: {"kl": kl} for step, kl in enumerate(values, start=1)}, signal="kl_explosion")
    assert flags == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # step 5: 0.6 is exactly 10 x 0.06, not more
    (message,) = doctor_warnings(caplog)
    assert "is 0.7 at step 6, up from 0.06 at step 1, more than doctor_kl_growth=10.0 times" in message


def test_the_early_climb_of_kl_from_zero_is_not_an_explosion(caplog):
    values = [0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.12, 0.3]  # many-fold, but from below KL_GROWTH_FLOOR = 0.05
    flags = observe_all(
        RunDiagnosis(), {step: {"kl": kl} for step, kl in enumerate(values, start=1)}, signal="kl_explosion"
    )
    assert set(flags) == {0.0} and doctor_warnings(caplog) == []


# --- (e) runaway truncation and length ---


def test_runaway_truncation(caplog):
    doctor = RunDiagnosis(max_completion_length=6)
    ratios = [0.6, 0.7, 0.8, 0.9, 1.0]
    logs = {step: {"completions/clipped_ratio": ratio} for step, ratio in enumerate(ratios, start=1)}
    assert observe_all(doctor, logs, signal="truncation") == [0.0, 0.0, 0.0, 0.0, 1.0]
    (message,) = doctor_warnings(caplog)
    assert "completions/clipped_ratio was between 0.6 and 1 on the 5 logs of steps 1 to 5 (last 1)" in message
    assert "doctor_clipped_ratio_threshold=0.5" in message and "max_completion_length=6" in message
    assert "overlong_buffer_len" in message and "mask_truncated_completions=True" in message


def test_mean_length_growing_to_the_limit(caplog):
    doctor = RunDiagnosis(max_completion_length=100)
    lengths = [20, 30, 40, 60, 70, 85, 90]
    logs = {step: {"completions/mean_length": length} for step, length in enumerate(lengths, start=1)}
    # 5 rises in a row by step 6 (85 tokens, above 0.8 x 100)
    assert observe_all(doctor, logs, signal="length_growth") == [0.0] * 5 + [1.0, 1.0]
    (message,) = doctor_warnings(caplog)
    assert "completions/mean_length rose on 5 logs in a row, from 20 tokens at step 1 to 85 at step 6" in message
    assert "85% of max_completion_length=100 (doctor_length_fraction=0.8)" in message


def test_long_but_steady_completions_are_not_length_growth(caplog):
    logs = {step: {"completions/mean_length": length} for step, length in enumerate([90, 95, 90, 95, 90, 95], 1)}
    assert set(observe_all(RunDiagnosis(max_completion_length=100), logs, signal="length_growth")) == {0.0}
    assert doctor_warnings(caplog) == []


def test_heavy_ppo_clipping(caplog):
    doctor = RunDiagnosis(DoctorThresholds(patience=2))
    logs = {1: {"clip_ratio/region_mean": 0.1}, 2: {"clip_ratio/region_mean": 0.3}, 3: {"clip_ratio/region_mean": 0.4}}
    assert observe_all(doctor, logs, signal="clipping") == [0.0, 0.0, 1.0]
    (message,) = doctor_warnings(caplog)
    assert "clip_ratio/region_mean was between 0.3 and 0.4 on the 2 logs of steps 2 to 3" in message
    assert "learning_rate" in message


# --- (f) a loss of 0 explained ---


def test_a_zero_loss_is_explained_once_as_expected_without_kl(caplog):
    doctor = RunDiagnosis(beta=0.0, loss_type="grpo")
    logs = {1: {"loss": 0.0, "grad_norm": 0.5}, 2: {"loss": 1e-8, "grad_norm": 0.4}, 3: {"loss": 0.3}}
    assert observe_all(doctor, logs, signal="loss_zero") == [1.0, 1.0, 0.0]
    (message,) = doctor_warnings(caplog)
    assert message.startswith("Run doctor (loss_zero): loss is 0 at step 1, which is expected in GRPO.")
    assert "ratio pi_theta / pi_old is 1" in message and "exactly 0" in message
    assert "is not 0 (grad_norm=0.5)" in message and "With beta=0 there is no KL term" in message


def test_a_zero_loss_with_a_kl_term_at_the_first_step(caplog):
    RunDiagnosis(beta=0.04, loss_type="dapo").observe({"loss": 0.0, "kl": 0.0, "grad_norm": 0.2}, 1)
    (message,) = doctor_warnings(caplog)
    assert "loss is 0 at step 1, which is expected in GRPO" in message and "near 0" in message
    assert "With beta=0.04 the loss also holds beta x kl" in message and "kl=0 here" in message


def test_a_zero_loss_with_a_zero_gradient_is_not_called_expected(caplog):
    RunDiagnosis().observe({"loss": 0.0, "grad_norm": 0.0, "frac_reward_zero_std": 1.0}, 3)
    (message,) = doctor_warnings(caplog)
    assert "loss is 0 at step 3 and this step learned nothing (grad_norm=0, frac_reward_zero_std=1)" in message
    assert "expected" not in message and "dynamic_sampling=True" in message


def test_a_zero_loss_of_a_loss_type_not_zero_by_design(caplog):
    RunDiagnosis(loss_type="cispo").observe({"loss": 0.0}, 2)
    (message,) = doctor_warnings(caplog)
    assert "loss is 0 at step 2. With loss_type='cispo' the loss value" in message and "not 0 by design" in message


def test_a_silent_doctor_still_returns_its_metrics(caplog):
    doctor = RunDiagnosis(DoctorThresholds(patience=1), speak=False)
    assert doctor.observe({"frac_reward_zero_std": 1.0, "loss": 0.0}, 1) == {
        "doctor/loss_zero": 1.0,
        "doctor/zero_std": 1.0,
    }
    assert doctor_warnings(caplog) == [] and doctor.said == {"loss_zero", "zero_std"}


def test_the_curves_ignore_doctor_metrics():
    from grpo_ext.plot import collect_curves

    history = [{"step": s, "reward": 0.1 * s, "doctor/zero_std": 1.0, "doctor/kl_explosion": 0.0} for s in (1, 2)]
    assert collect_curves(history) == [("Reward", {"reward": ([1, 2], [0.1, 0.2])})]


# --- In a run ---


def test_a_run_whose_groups_never_vary_is_diagnosed(tokenizer, make_args, caplog):

    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    args = make_args(max_steps=3, beta=0.0, doctor_patience=2)
    trainer = tiny_trainer(tokenizer, args, reward_funcs=constant_reward)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "frac_reward_zero_std" in entry]
    assert [entry["frac_reward_zero_std"] for entry in logged] == [1.0, 1.0, 1.0]
    assert [entry["doctor/zero_std"] for entry in logged] == [0.0, 1.0, 1.0]
    assert [entry["doctor/loss_zero"] for entry in logged] == [1.0, 1.0, 1.0]
    zero_std, loss_zero = (
        [m for m in doctor_warnings(caplog) if m.startswith(f"Run doctor ({signal})")]
        for signal in ("zero_std", "loss_zero")
    )
    assert len(zero_std) == 1 and "frac_reward_zero_std was 1 on the 2 logs of steps 1 to 2" in zero_std[0]
    assert len(loss_zero) == 1 and "loss is 0 at step 1 and this step learned nothing" in loss_zero[0]


def test_the_doctor_can_be_turned_off(tokenizer, make_args):

    trainer = tiny_trainer(tokenizer, make_args(max_steps=1, doctor_live=False))
    trainer.train()
    assert not any(key.startswith("doctor/") for entry in trainer.state.log_history for key in entry)
