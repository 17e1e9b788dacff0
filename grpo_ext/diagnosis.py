"""The run doctor's live diagnosis: tells the user in plain words, while training, when a GRPO run is not learning.

`RunDiagnosis.observe(logs, step, mode)` reads the metrics the trainer is about to log (TRL's names) and returns
`doctor/<signal>` metrics to add to the same logs, so every tracker charts them. The first time a signal fires it
says once, through `logging`, what was seen, the numbers, the step and the fix. The signals:

| metric | fires when (thresholds: `DoctorThresholds`, the config's `doctor_*` fields) |
| --- | --- |
| `doctor/loss_zero` | `loss` is 0 (abs < 1e-6); said once: why that is expected in GRPO, or that the gradient is 0 too |
| `doctor/zero_std` | `frac_reward_zero_std` > `zero_std_threshold` on `patience` logs in a row |
| `doctor/truncation` | `completions/clipped_ratio` > `clipped_ratio_threshold` on `patience` logs in a row |
| `doctor/length_growth` | `completions/mean_length` rose on `patience` logs in a row, to `length_fraction` of the limit |
| `doctor/clipping` | `clip_ratio/region_mean` > `clip_ratio_threshold` on `patience` logs in a row |
| `doctor/entropy_collapse` | `entropy` < `entropy_floor`, or < `entropy_drop` x its first value, on `patience` logs |
| `doctor/kl_explosion` | `kl` > `kl_threshold`, or grew `kl_growth` times over `patience` logs from at least `KL_GROWTH_FLOOR` |
| `doctor/reward_hacking` | (eval logs) mean train `reward` rose and the eval task metric fell, `hacking_patience` times |

A metric is 1.0 while its signal fires and 0.0 otherwise, and is only returned when the metric it reads is in the
logs (no `doctor/kl_explosion` without a KL term). The warnings go to the `grpo_ext.diagnosis` logger.

It does not look at tensors, models or data: it reads a dict of numbers, so it costs nothing, and it imports nothing
from the trainer. Its state (streaks, the first entropy, the rewards since the last evaluation) lives in memory only:
a resumed run starts counting again, so a signal takes `patience` logs (`hacking_patience` evaluations) to fire
again after a resume, and may then say its warning a second time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# |loss| below this is "0": the policy term of an on-policy GRPO step is 0 up to float rounding.
ZERO = 1e-6
TASK_METRIC_PREFIX = "eval_pass@1/"
KL_GROWTH_FLOOR = 0.05  # nats per token: growth from below it is KL's normal climb from 0, not an explosion

# The value of each loss type's policy term on on-policy data (ratio pi_theta / pi_old = 1), where advantages have
# zero mean within each group (objective.LOSS_TYPES has the formulas). `cispo` and `vespo` weight log pi by the
# advantage: their value is not 0 by design, so they are not here.
_POLICY_VALUE_ON_POLICY = {
    "grpo": "exactly 0: each completion's token mean of ratio x advantage is its advantage, and the advantages of a "
    "group average to 0",
    "sapo": "near 0: at ratio 1 each token's term is -2/tau x advantage, and the advantages of a group average to 0 "
    "(exactly 0 when sapo_temperature_pos equals sapo_temperature_neg)",
    **dict.fromkeys(
        ("dapo", "dr_grpo", "bnpo", "luspo"),
        "near 0: it is minus a length-weighted average of the advantages, which average to 0 within each group "
        "(exactly 0 when a group's completions are equally long)",
    ),
}


@dataclass(frozen=True)
class DoctorThresholds:
    """The thresholds of the live signals. Each is the `GRPOExtConfig` field `doctor_<name>`, with the same default;
    its help text says why."""

    patience: int = 5
    zero_std_threshold: float = 0.9
    clipped_ratio_threshold: float = 0.5
    length_fraction: float = 0.8
    clip_ratio_threshold: float = 0.2
    entropy_floor: float = 0.05
    entropy_drop: float = 0.1
    kl_threshold: float = 1.0
    kl_growth: float = 10.0
    hacking_patience: int = 2

    @classmethod
    def from_config(cls, args) -> DoctorThresholds:
        return cls(**{f.name: getattr(args, f"doctor_{f.name}") for f in dataclasses.fields(cls)})


class RunDiagnosis:
    """Reads each log of a run and returns its `doctor/*` metrics; warns once per signal (module docstring).

    Args:
        thresholds: the signals' thresholds (defaults: the config's defaults).
        beta, loss_type: the run's objective, to explain a loss of 0 accurately.
        max_completion_length: the length limit; None leaves `doctor/length_growth` out.
        task_metric: the eval metric whose fall, while the reward rises, is reward hacking (e.g.
            `eval_pass@1/answer_line`); None takes the first `eval_pass@1/...` key logged.
        greater_is_better: whether a larger task metric is better.
        speak: whether to emit the warnings (the main process only, so N processes do not say it N times); the
            metrics are returned either way.
    """

    def __init__(
        self,
        thresholds: DoctorThresholds | None = None,
        *,
        beta: float = 0.0,
        loss_type: str = "grpo",
        max_completion_length: int | None = None,
        task_metric: str | None = None,
        greater_is_better: bool = True,
        speak: bool = True,
    ):
        self.thresholds = thresholds or DoctorThresholds()
        self.beta, self.loss_type, self.max_completion_length = beta, loss_type, max_completion_length
        self.task_metric, self.greater_is_better = task_metric, greater_is_better
        self.speak = speak
        self.said: set[str] = set()  # signals already warned about
        self._streaks: dict[str, list[tuple[int, float]]] = {}  # signal -> (step, value) of the logs it held on
        self._last_length: float | None = None
        self._first_entropy: tuple[int, float] | None = None
        self._kl_history: list[tuple[int, float]] = []  # the last patience + 1 logged kl values
        self._rewards_since_eval: list[float] = []
        self._last_eval: tuple[int, float, float] | None = None  # (step, mean train reward before it, task metric)
        self._hacking: list[tuple[int, int, float, float, float, float]] = []  # consecutive evaluations that fit

    @classmethod
    def from_config(cls, args, speak: bool = True) -> RunDiagnosis:
        """From a `GRPOExtConfig` (read by name: this module does not import the config)."""
        task_metric, greater_is_better = args.metric_for_best_model, args.greater_is_better
        if task_metric is not None and not task_metric.startswith("eval_"):  # as transformers prefixes it
            task_metric = f"eval_{task_metric}"
        if task_metric == "eval_loss":  # GRPO's eval loss is ~0 by design: it measures no task
            task_metric, greater_is_better = None, True
        return cls(
            DoctorThresholds.from_config(args),
            beta=args.beta,
            loss_type=args.loss_type,
            max_completion_length=args.max_completion_length,
            task_metric=task_metric,
            greater_is_better=greater_is_better is not False,
            speak=speak,
        )

    def observe(self, logs: dict[str, float], step: int, mode: str = "train") -> dict[str, float]:
        """The `doctor/*` metrics of one log (`mode` "train" or "eval", eval keys prefixed `eval_`), warning once
        per signal the first time it fires."""
        found = {}
        if mode == "train":
            found.update(self._loss_zero(logs, step))
            found.update(self._persistent_signals(logs, step))
            found.update(self._length_growth(logs, step))
            found.update(self._kl_explosion(logs, step))
            if (reward := _number(logs, "reward")) is not None:
                self._rewards_since_eval.append(reward)
        found.update(self._reward_hacking(logs, step))
        return found

    # --- Train signals ---

    def _loss_zero(self, logs, step) -> dict[str, float]:
        loss = _number(logs, "loss")
        if loss is None:
            return {}
        if abs(loss) < ZERO:
            self._say_once("loss_zero", lambda: self._explain_zero_loss(logs, step, loss))
        return {"doctor/loss_zero": float(abs(loss) < ZERO)}

    def _explain_zero_loss(self, logs, step, loss) -> str:
        grad_norm, zero_std = _number(logs, "grad_norm"), _number(logs, "frac_reward_zero_std")
        seen = f"loss is {_fmt(loss)} at step {step}"
        if (grad_norm is not None and grad_norm < ZERO) or (zero_std is not None and zero_std >= 1.0):
            numbers = ", ".join(
                f"{name}={_fmt(value)}"
                for name, value in (("grad_norm", grad_norm), ("frac_reward_zero_std", zero_std))
                if value is not None
            )
            return (
                f"{seen} and this step learned nothing ({numbers}): when every group's completions get the same "
                "reward, every advantage is 0 and so is the policy gradient. Fix: dynamic_sampling=True, easier "
                "(or harder) prompts, a larger num_generations, or a reward with partial credit."
            )
        gradient = f" (grad_norm={_fmt(grad_norm)})" if grad_norm is not None else ""
        if self.loss_type not in _POLICY_VALUE_ON_POLICY:
            return (
                f"{seen}. With loss_type={self.loss_type!r} the loss value (advantage-weighted log pi) is not 0 by "
                f"design, so a 0 usually means the advantages were ~0: check frac_reward_zero_std and reward_std. "
                f"The gradient can still be non-zero{gradient}."
            )
        if self.beta > 0:
            kl = _number(logs, "kl")
            kl_term = (
                f"With beta={self.beta} the loss also holds beta x kl, which is 0 while the policy still equals the "
                f"reference, as at the first steps (kl={_fmt(kl) if kl is not None else 'not logged'} here), and "
                "stays small afterwards."
            )
        else:
            kl_term = "With beta=0 there is no KL term: the loss is that value alone."
        return (
            f"{seen}, which is expected in GRPO. On on-policy data the ratio pi_theta / pi_old is 1, so the policy "
            f"term's value is {_POLICY_VALUE_ON_POLICY[self.loss_type]}; its gradient, the advantage-weighted sum of "
            f"grad log pi, is not 0{gradient}. {kl_term} Judge learning by reward and the eval metrics, not by the "
            "loss."
        )

    def _persistent_signals(self, logs, step) -> dict[str, float]:
        """The signals that fire when one logged value stays past its threshold for `patience` logs in a row."""
        t, found = self.thresholds, {}
        reward = _number(logs, "reward")
        limit = f"max_completion_length={self.max_completion_length}" if self.max_completion_length else "the limit"
        if (value := _number(logs, "frac_reward_zero_std")) is not None:
            found["doctor/zero_std"] = self._persists(
                "zero_std",
                value > t.zero_std_threshold,
                step,
                value,
                lambda streak: (
                    f"frac_reward_zero_std {_streak_text(streak)}, above doctor_zero_std_threshold="
                    f"{t.zero_std_threshold}: in that share of groups every completion got the same reward "
                    f"(mean reward {_fmt(reward) if reward is not None else 'not logged'}), so their advantages are 0 "
                    "and they teach the policy nothing. Fix: dynamic_sampling=True (samples more prompts until groups "
                    "vary), easier prompts if the reward is near its minimum (harder if near its maximum), a larger "
                    "num_generations, or a reward with partial credit."
                ),
            )
        if (value := _number(logs, "completions/clipped_ratio")) is not None:
            found["doctor/truncation"] = self._persists(
                "truncation",
                value > t.clipped_ratio_threshold,
                step,
                value,
                lambda streak: (
                    f"completions/clipped_ratio {_streak_text(streak)}, above doctor_clipped_ratio_threshold="
                    f"{t.clipped_ratio_threshold}: that share of completions is cut at {limit} before it ends, so "
                    "their rewards score unfinished answers. Fix: raise max_completion_length, or discourage length: "
                    "overlong_buffer_len (DAPO's soft overlong penalty), missing_eos_penalty, or "
                    "mask_truncated_completions=True to leave cut completions out of the loss."
                ),
            )
        if (value := _number(logs, "clip_ratio/region_mean")) is not None:
            found["doctor/clipping"] = self._persists(
                "clipping",
                value > t.clip_ratio_threshold,
                step,
                value,
                lambda streak: (
                    f"clip_ratio/region_mean {_streak_text(streak)}, above doctor_clip_ratio_threshold="
                    f"{t.clip_ratio_threshold}: that share of tokens has its ratio pi_theta / pi_old clipped, so the "
                    "policy moves too far on each rollout and clipped tokens give no gradient. Fix: a lower "
                    "learning_rate, fewer num_iterations or steps_per_generation per rollout, or a wider epsilon_high."
                ),
            )
        if (value := _number(logs, "entropy")) is not None:
            if self._first_entropy is None:
                self._first_entropy = (step, value)
            first_step, first = self._first_entropy
            found["doctor/entropy_collapse"] = self._persists(
                "entropy_collapse",
                value < t.entropy_floor or value < t.entropy_drop * first,
                step,
                value,
                lambda streak: (
                    f"entropy (nats per token) {_streak_text(streak)} (first logged: {_fmt(first)} at step "
                    f"{first_step}), below doctor_entropy_floor={t.entropy_floor} or doctor_entropy_drop="
                    f"{t.entropy_drop} of its first value: the policy became nearly deterministic, so the completions "
                    "of a group are alike and exploration stops. Fix: a higher temperature, an entropy bonus "
                    "(entropy_coef > 0 or use_adaptive_entropy=True), epsilon_high=0.28 (DAPO's clip-higher), or a "
                    "lower learning_rate."
                ),
            )
        return found

    def _persists(self, signal: str, held: bool, step: int, value: float, message: Callable[[list], str]) -> float:
        """Extend or end the signal's streak; 1.0 (and a warning, once) when it has held for `patience` logs."""
        streak = self._streaks.setdefault(signal, [])
        if held:
            streak.append((step, value))
        else:
            streak.clear()
        if len(streak) < self.thresholds.patience:
            return 0.0
        self._say_once(signal, lambda: message(streak))
        return 1.0

    def _length_growth(self, logs, step) -> dict[str, float]:
        length = _number(logs, "completions/mean_length")
        if length is None or not self.max_completion_length:
            return {}
        t, limit = self.thresholds, self.max_completion_length
        rising = self._last_length is not None and length > self._last_length
        self._last_length = length
        streak = self._streaks.setdefault("length_growth", [])
        if rising:
            streak.append((step, length))
        else:
            streak[:] = [(step, length)]  # a new run of rises starts from this log
        rises = len(streak) - 1
        if rises < t.patience or length < t.length_fraction * limit:
            return {"doctor/length_growth": 0.0}
        self._say_once(
            "length_growth",
            lambda: (
                f"completions/mean_length rose on {rises} logs in a row, from {_fmt(streak[0][1])} tokens at step "
                f"{streak[0][0]} to {_fmt(length)} at step {step}: {length / limit:.0%} of max_completion_length="
                f"{limit} (doctor_length_fraction={t.length_fraction}), so completions will soon be cut off. Fix: "
                "discourage length with overlong_buffer_len (DAPO's soft overlong penalty) or missing_eos_penalty, "
                "or raise max_completion_length if longer answers are wanted."
            ),
        )
        return {"doctor/length_growth": 1.0}

    def _kl_explosion(self, logs, step) -> dict[str, float]:
        kl = _number(logs, "kl")
        if kl is None:
            return {}
        t = self.thresholds
        self._kl_history = [*self._kl_history, (step, kl)][-(t.patience + 1) :]
        earlier_step, earlier = self._kl_history[0]
        # The growth rule starts from KL_GROWTH_FLOOR: KL starts at 0 (policy == reference) and its early climb is
        # many-fold in every healthy run
        grew = earlier >= KL_GROWTH_FLOOR and kl > t.kl_growth * earlier
        if not (kl > t.kl_threshold or grew):
            return {"doctor/kl_explosion": 0.0}
        seen = (
            f"above doctor_kl_threshold={t.kl_threshold}"
            if kl > t.kl_threshold
            else f"up from {_fmt(earlier)} at step {earlier_step}, more than doctor_kl_growth={t.kl_growth} times"
        )
        self._say_once(
            "kl_explosion",
            lambda: (
                f"kl (mean per-token KL to the reference) is {_fmt(kl)} at step {step}, {seen}: the policy is moving "
                "away from the reference fast, which usually comes with degenerate text or reward hacking. Fix: a "
                f"larger beta (now {self.beta}), a lower learning_rate, a reward-side KL (reward_kl_coef), and a look "
                "at the completions (log_completions=True)."
            ),
        )
        return {"doctor/kl_explosion": 1.0}

    # --- Eval signal ---

    def _reward_hacking(self, logs, step) -> dict[str, float]:
        """At each evaluation logging the task metric: did the mean train reward since the previous evaluation rise
        while the task metric fell? `hacking_patience` such evaluations in a row fire the signal."""
        if self.task_metric is None:  # the first pass@1 metric logged, kept for the whole run
            self.task_metric = next((key for key in logs if key.startswith(TASK_METRIC_PREFIX)), None)
        task = _number(logs, self.task_metric) if self.task_metric else None
        if task is None:
            return {}
        patience = self.thresholds.hacking_patience
        if not self._rewards_since_eval:  # no train reward since the last evaluation: nothing to compare yet
            return {"doctor/reward_hacking": float(len(self._hacking) >= patience)}
        reward = sum(self._rewards_since_eval) / len(self._rewards_since_eval)
        self._rewards_since_eval = []
        if self._last_eval is not None:
            last_step, last_reward, last_task = self._last_eval
            task_fell = task < last_task if self.greater_is_better else task > last_task
            if reward > last_reward and task_fell:
                self._hacking.append((last_step, step, last_reward, reward, last_task, task))
            else:
                self._hacking = []
        self._last_eval = (step, reward, task)
        if len(self._hacking) < patience:
            return {"doctor/reward_hacking": 0.0}
        key = self.task_metric
        self._say_once(
            "reward_hacking",
            lambda: (
                f"the mean training reward rose while {key} fell on {len(self._hacking)} evaluations in a row ("
                + "; ".join(
                    f"step {a} -> {b}: reward {_fmt(r0)} -> {_fmt(r1)}, {key} {_fmt(m0)} -> {_fmt(m1)}"
                    for a, b, r0, r1, m0, m1 in self._hacking
                )
                + "): the policy is getting better at the reward function, not at the task (reward hacking). Fix: "
                "read the completions (log_completions=True) for what the reward pays without a correct answer "
                "(format alone, length, a parsing loophole) and tighten that reward function; keep a KL term (beta > "
                f"0); keep the best checkpoint (load_best_model_at_end=True, metric_for_best_model={key!r})."
            ),
        )
        return {"doctor/reward_hacking": 1.0}

    def _say_once(self, signal: str, message: Callable[[], str]) -> None:
        if signal in self.said:
            return
        self.said.add(signal)
        if self.speak:
            logger.warning("Run doctor (%s): %s", signal, message())


def _number(logs: dict, key: str) -> float | None:
    """The logged value of `key` as a float, or None when it is absent or not a finite number."""
    value = logs.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _streak_text(streak: list[tuple[int, float]]) -> str:
    """`was between 0.92 and 1 on the 5 logs of steps 10 to 50 (last 1)`, or `was 1 on the ...` when constant."""
    values = [value for _, value in streak]
    low, high = _fmt(min(values)), _fmt(max(values))
    logs = f"on the {len(streak)} logs of steps {streak[0][0]} to {streak[-1][0]}"
    return f"was {low} {logs}" if low == high else f"was between {low} and {high} {logs} (last {_fmt(values[-1])})"
