"""Task metrics: how often a policy solves held-out problems, as opposed to the rewards it is trained on.

A *task metric* is a reward function (TRL's contract) that returns 1.0 for a correct completion and 0.0 (or None)
otherwise, e.g. `reward_models.accuracy_reward`. Each problem is answered greedily once and, with k > 1, k times by
sampling; from the scores:

- `pass@1`: the greedy answer's score, averaged over problems (DeepSeekMath's top-1 accuracy, arXiv 2402.03300,
  section 4.2);
- `sampled_pass@1`: the mean score of the k samples;
- `pass@k`: the chance that at least one of k samples is correct, Chen et al.'s unbiased estimator
  `1 - C(n - c, k) / C(n, k)` over the n samples drawn (arXiv 2107.03374), which is "any of the k" when n = k;
- `maj@k`: the score of the answer most samples agree on (DeepSeekMath's maj@64), the vote taken over final answers
  (`answer_key`, by default the number or expression `reward_models.accuracy.extract_answer` finds).

A score of None counts as 0 (not solved), a score above 0.5 as solved for pass@k. Generation goes through the
rollout engine (engine.py: prefix sharing, finished rows dropped, the training stop rule).
The trainer evaluates during training with these functions (`GRPOExtTrainer.evaluate` with `eval_reward_funcs`),
sharding the problems over processes; `evaluate_accuracy` is the same for a model alone (`recipes/evaluate.py`).
Single-turn only: tool calls are not run here.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

import torch
from accelerate.utils import gather_object
from datasets import IterableDataset
from tqdm.auto import tqdm
from transformers.trainer_utils import EvalLoopOutput

from reward_models._text import completion_text

from .drafting import DraftMemory
from .engine import RolloutEngine
from .models import unwrapped_for_generation
from .rollout import eos_token_ids
from .vision import has_images, tokenizer_of, with_images

logger = logging.getLogger(__name__)

SOLVED = 0.5  # a score above this counts as a solved problem for pass@k


# --- The metrics, from scores ---


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k from n samples of which c are correct: `1 - C(n - c, k) / C(n, k)`."""
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {num_samples}.")
    if num_samples - num_correct < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def majority_index(answer_keys: list) -> int:
    """The sample that casts the winning vote: the first one giving the most frequent non-empty answer (ties go to the
    answer seen first); sample 0 when no sample has an answer."""
    votes = Counter(key for key in answer_keys if key)
    if not votes:
        return 0
    return answer_keys.index(votes.most_common(1)[0][0])


def sampled_metrics(scores: list[list[float]], answer_keys: list[list] | None = None) -> dict[str, float]:
    """`sampled_pass@1`, `pass@k` and (with answer keys) `maj@k` over problems, from k scores per problem."""
    k = len(scores[0])
    solved = [sum(score > SOLVED for score in problem) for problem in scores]
    metrics = {
        "sampled_pass@1": _mean([sum(problem) / k for problem in scores]),
        f"pass@{k}": _mean([pass_at_k(k, c, k) for c in solved]),
    }
    if answer_keys is not None:
        metrics[f"maj@{k}"] = _mean(
            [problem[majority_index(keys)] for problem, keys in zip(scores, answer_keys, strict=True)]
        )
    return metrics


def task_metrics(
    names: list[str],
    greedy_scores: torch.Tensor,
    sampled_scores: torch.Tensor | None = None,
    answer_keys: list[list] | None = None,
) -> dict[str, float]:
    """Metrics per task metric, named `<metric>/<name>`: `pass@1` from the greedy scores `(N, K)` of N problems and
    K task metrics, the sampled ones from `(N, k, K)` (NaN, a None score, counts as 0)."""
    metrics = {}
    for j, name in enumerate(names):
        metrics[f"pass@1/{name}"] = _mean(greedy_scores[:, j].nan_to_num(0.0).tolist())
        if sampled_scores is not None:
            per_problem = sampled_scores[:, :, j].nan_to_num(0.0).tolist()  # (N, k)
            for metric, value in sampled_metrics(per_problem, answer_keys).items():
                metrics[f"{metric}/{name}"] = value
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def default_answer_key() -> Callable[[str], str]:
    """The final answer of a completion text for the majority vote: `reward_models.accuracy.extract_answer`."""
    from reward_models.accuracy import extract_answer

    return lambda text: (extract_answer(text) or "").strip()


# --- Generation: k answers per problem through the rollout engine ---


def greedy_config(generation_config):
    """The sampling config made greedy, everything else (length, stop tokens, cache) kept."""
    greedy = copy.deepcopy(generation_config)
    greedy.do_sample = False
    for name in ("temperature", "top_p", "top_k", "min_p"):
        setattr(greedy, name, None)
    return greedy


@torch.no_grad()
def generate_answers(
    engine: RolloutEngine,
    model,
    prompts: list,
    num_samples: int,
    generation_config,
    batch_size: int = 32,
    progress: bool = False,
    device=None,
) -> tuple[list[list[int]], list]:
    """`num_samples` completions of each prompt (in a row), generated as training rollouts are (`engine.generate`):
    their ids up to the first stop token, and the completions as reward functions receive them (text, or an assistant
    message for chat prompts). `batch_size` counts completions per `generate` call (whole groups)."""
    plan = engine.plan(model, generation_config)
    prompts_per_batch = max(batch_size // num_samples, 1)
    completion_ids, completions = [], []
    starts = range(0, len(prompts), prompts_per_batch)
    for start in tqdm(starts, desc="Evaluating", unit="batch", disable=not progress):
        rows = [prompt for prompt in prompts[start : start + prompts_per_batch] for _ in range(num_samples)]
        generation = engine.generate(model, rows, num_samples, plan, generation_config=generation_config, device=device)
        completion_ids += generation.completion_ids
        completions += generation.completions
    return completion_ids, completions


# --- Sharing problems out over processes, and scoring their answers ---


def process_share(dataset, rank: int, world: int) -> tuple[list[int], list[dict]]:
    """This process's problems `rank, rank + world, ...` of `dataset` (a stream is read whole), and their rows padded
    with row 0 to the same count on every process, so every process runs the same generation forwards."""
    rows = list(dataset) if isinstance(dataset, IterableDataset) else None
    num_rows = len(rows) if rows is not None else len(dataset)
    indices = list(range(rank, num_rows, world))
    padded = indices + [0] * (math.ceil(num_rows / world) - len(indices))  # repeats of row 0, dropped when gathered
    return indices, [(rows[i] if rows is not None else dataset[i]) for i in padded]


def score_answers(
    scorer, rows: list[dict], answers, samples=None, shared: dict | None = None, answer_key=None
) -> list[tuple]:
    """Per problem `(greedy scores (K,), sampled scores (k, K) or None, the samples' final answers or None)`, from the
    `(completion_ids, completions)` of `generate_answers` (one answer each, and k samples each); `shared` arguments
    (`trainer_state`) go to every metric as they are; `answer_key` (text -> hashable, default `default_answer_key()`)
    finds the final answers the majority vote compares."""
    prompts = [row["prompt"] for row in rows]
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    greedy = scorer.score(prompts, answers[1], answers[0], {**columns, **(shared or {})})  # (n, K)
    if samples is None:
        return [(scores, None, None) for scores in greedy]
    k = len(samples[0]) // len(rows)
    repeated = {key: [value for value in values for _ in range(k)] for key, values in columns.items()}
    prompts_k = [prompt for prompt in prompts for _ in range(k)]
    sampled = scorer.score(prompts_k, samples[1], samples[0], {**repeated, **(shared or {})})  # (n * k, K)
    answer_key = answer_key or default_answer_key()
    keys = [answer_key(completion_text(completion)) for completion in samples[1]]
    return [(greedy[i], sampled[i * k : (i + 1) * k], keys[i * k : (i + 1) * k]) for i in range(len(rows))]


def metrics_of_problems(names: list[str], problems: list[tuple]) -> dict[str, float]:
    """`task_metrics` of the problems `score_answers` scored (gathered from every process)."""
    sampled = problems[0][1] is not None
    return task_metrics(
        names,
        torch.stack([problem[0] for problem in problems]).cpu(),  # (N, K)
        torch.stack([problem[1] for problem in problems]).cpu() if sampled else None,  # (N, k, K)
        [problem[2] for problem in problems] if sampled else None,
    )


def rows_with_image_prompts(rows: list[dict]) -> list[dict]:
    """The rows with an image column's images as image parts of their prompts (`vision.with_images`), as a training
    rollout makes them: what generation answers and what the task metrics receive."""
    prompts = with_images([row["prompt"] for row in rows], rows)
    return [{**row, "prompt": prompt} for row, prompt in zip(rows, prompts, strict=True)]


# --- A model alone (recipes/evaluate.py) ---


def evaluate_accuracy(
    model,
    tokenizer,
    dataset,
    num_samples=1,
    max_new_tokens=256,
    temperature=1.0,
    batch_size=32,
    answer_key=None,
    reward_funcs: dict | None = None,
) -> dict:
    """Task metrics of `model` on a dataset with `prompt` and `answer` columns, as the trainer measures them: one
    greedy answer per problem and, with `num_samples=k > 1`, k samples at `temperature`. With a vision-language
    model, `tokenizer` is its processor and an `image` / `images` column goes into the prompts as in training; every
    column reaches the task metrics.

    `reward_funcs` (name -> task metric) default to `{"accuracy": reward_models.accuracy_reward}` (math-verify). The
    result has `pass@1/<name>` (greedy) and with k > 1 `sampled_pass@1/<name>`, `pass@k/<name>`, `maj@k/<name>` for
    each, the first metric's also as `pass@1` and `maj@k`, and `num_problems`. `answer_key` (text -> hashable) finds
    the final answers the vote compares (default `default_answer_key()`).
    """
    from transformers import GenerationConfig

    from reward_models.accuracy import accuracy_reward

    scorer = task_scorer(reward_funcs or {"accuracy": accuracy_reward})
    model.eval()
    text_tokenizer = tokenizer_of(tokenizer)  # a processor's own tokenizer
    stop_ids = eos_token_ids(model, text_tokenizer)  # the same stop rule as training rollouts
    sampling = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        pad_token_id=text_tokenizer.pad_token_id,
        eos_token_id=stop_ids,
    )
    rows = rows_with_image_prompts(list(dataset))
    prompts = [row["prompt"] for row in rows]

    engine = RolloutEngine(tokenizer, sampling, stop_ids, max_new_tokens)
    answers = generate_answers(engine, model, prompts, 1, greedy_config(sampling), batch_size, progress=True)
    samples = None
    if num_samples > 1:
        samples = generate_answers(engine, model, prompts, num_samples, sampling, batch_size, progress=True)
    results = metrics_of_problems(scorer.names, score_answers(scorer, rows, answers, samples, answer_key=answer_key))
    first = scorer.names[0]
    headline = {"pass@1": results[f"pass@1/{first}"]}
    if num_samples > 1:
        headline[f"maj@{num_samples}"] = results[f"maj@{num_samples}/{first}"]
    return {**headline, **results, "num_problems": len(prompts)}


# --- Task metrics by name ---


def task_scorer(metrics: dict[str, Callable]):
    """A `RewardScorer` of the task metrics (name -> function) under the names given: TRL's calling contract, None
    and non-finite scores kept out (as NaN, counted as 0 by `task_metrics`)."""
    from .reward_scoring import RewardScorer

    scorer = RewardScorer(list(metrics.values()), nonfinite_rewards="drop")
    scorer.names = list(metrics)  # the names the user wrote, which the metric names carry
    return scorer


def task_metrics_of(names: list | None, rewards, multi_turn: bool = False):
    """The trainer's task metrics (`eval_reward_funcs`, resolved against its `RewardScorer` `rewards`), or None
    without names; resolved at start, so a name that loads nothing fails before training."""
    if not names:
        return None
    if multi_turn:
        raise ValueError(
            "eval_reward_funcs measures single-turn answers; with tools, an environment_factory or a rollout_func it "
            "is not supported yet. Score the task in a reward function and read eval_rewards/<name>/mean instead."
        )
    return task_scorer(resolve_task_metrics(names, dict(zip(rewards.names, rewards.reward_funcs, strict=True))))


def resolve_task_metrics(names: list, reward_funcs: dict[str, Callable]) -> dict[str, Callable]:
    """name -> task metric for `eval_reward_funcs`: one of the trainer's reward functions (`reward_funcs`, by the name
    in `rewards/<name>/mean`), else a `reward_models` registry name or dotted import path; a callable is taken as
    it is (named by its `__name__`)."""
    from reward_models.registry import get_reward_funcs

    resolved = {}
    for entry in names:
        if callable(entry):
            resolved[getattr(entry, "__name__", type(entry).__name__)] = entry
        elif entry in reward_funcs:
            resolved[entry] = reward_funcs[entry]
        else:
            try:
                resolved[entry] = get_reward_funcs([entry], warn_unused=False)[0]
            except (ValueError, TypeError, ImportError) as error:
                raise ValueError(
                    f"eval_reward_funcs: {entry!r} is not a reward function of this trainer ({', '.join(reward_funcs)}) "
                    f"and could not be loaded: {error}"
                ) from error
    return resolved


# --- In a trainer: the task metrics beside TRL's evaluation ---


class TaskEvaluationMixin:
    """`Trainer.evaluate` with the task metrics of `eval_reward_funcs` (`eval_pass@1/<name>`, ...) in the same log
    line and the returned metrics, where `metric_for_best_model`, `load_best_model_at_end` and
    `EarlyStoppingCallback` read them; `eval_task_metrics_only` skips TRL's evaluation rollout. Mixed into
    `GRPOExtTrainer`, which sets `task_metrics`, `rollout_engine` and `eos_token_ids`."""

    _task_dataset = None  # the set the evaluation under way measures the task metrics on
    _answering_engine = None  # the rollout engine of the greedy answers, drafting from the previous evaluation's
    _unscored_task_metrics: set  # task metrics warned about once

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # transformers' own call for one named set of an eval dict
            dataset = self.eval_dataset[dataset]
        if self.task_metrics is None or isinstance(dataset, dict):  # a dict: called again for each of its sets
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._task_dataset = dataset  # for evaluation_loop, which transformers times, logs and reports
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._task_dataset = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        if self._task_dataset is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        task = {f"{prefix}_{key}": value for key, value in self._evaluate_task(self._task_dataset).items()}
        if self.args.eval_task_metrics_only:
            num_problems = int(task[f"{prefix}_task_problems"])
            return EvalLoopOutput(predictions=None, label_ids=None, metrics=task, num_samples=num_problems)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        output.metrics.update(task)  # before transformers logs them and hands them to the callbacks
        return output

    def _evaluate_task(self, dataset) -> dict[str, float]:
        """Task metrics of the policy on `dataset`: its problems shared out over processes, answered greedily and
        with `eval_num_samples` samples, scored, gathered; `task_runtime` is what it took (seconds)."""
        start_time = time.perf_counter()
        args, k, engine = self.args, self.args.eval_num_samples, self.rollout_engine
        indices, rows = process_share(dataset, self.accelerator.process_index, self.accelerator.num_processes)
        rows = rows_with_image_prompts(rows)
        prompts = [row["prompt"] for row in rows]
        batch, device = args.per_device_eval_batch_size, self.accelerator.device
        self.model.eval()
        with unwrapped_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            checkpointing_kwargs=args.activation_checkpointing_kwargs,
        ) as model:
            if self._answering_engine is None:  # the greedy answers of one evaluation draft those of the next
                memory = DraftMemory(args.speculative_memory_prompts, per_prompt=1)
                self._answering_engine = engine.with_drafts(args.eval_speculative_draft_tokens, memory)
            # Images: no drafts (the plan would drop them, warning of a default the user never set)
            answering = engine if has_images(prompts) else self._answering_engine
            greedy = greedy_config(engine.generation_config)
            answers = generate_answers(answering, model, prompts, 1, greedy, batch, device=device)
            samples = None
            if k > 1:
                samples = generate_answers(engine, model, prompts, k, engine.generation_config, batch, device=device)
        problems = score_answers(self.task_metrics, rows, answers, samples, shared={"trainer_state": self.state})
        problems = gather_object(problems[: len(indices)])  # every process's real problems
        self._warn_unscored_task_metrics(torch.stack([problem[0] for problem in problems]), list(rows[0]))
        metrics = metrics_of_problems(self.task_metrics.names, problems)
        return {**metrics, "task_problems": float(len(problems)), "task_runtime": time.perf_counter() - start_time}

    def _warn_unscored_task_metrics(self, scores: torch.Tensor, columns: list[str]) -> None:
        """Once per metric: a task metric that returned None (NaN) for every problem `(N, K)` (a missing column it
        reads, most often) would report 0 at each evaluation without a word."""
        for name, scored in zip(self.task_metrics.names, (~scores.isnan()).any(0).tolist(), strict=True):
            if not scored and name not in self._unscored_task_metrics:
                self._unscored_task_metrics.add(name)
                logger.warning(
                    f"Task metric {name!r} (eval_reward_funcs) scored none of the {scores.size(0)} eval problems: it "
                    f"returned None for each, so it is reported as 0. Does the eval set have the column it reads? "
                    f"Its columns: {columns}."
                )
