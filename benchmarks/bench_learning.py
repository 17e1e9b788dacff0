"""Learning per hour: trl.GRPOTrainer and GRPOExtTrainer on the real model, each given the same wall-clock budget.

    make bench-learning                                  # 2 x 10 minutes of training, plus the evaluations
    python benchmarks/bench_learning.py --minutes 20 --seeds 0 1

The workload is the real-model demo's (bench_step.py --real): SmolLM2-135M-Instruct + LoRA, "What is a times b?"
(`testing.make_multiplication_splits`), rewards `accuracy` and `answer_line`, the same GRPOConfig fields for both
trainers. Before training, the held-out set is answered greedily (pass@1) and with k samples at the training
temperature (pass@k): the gap is what GRPO can turn into greedy accuracy. Each trainer then trains in its own process
until its training time reaches the budget; at `--marks` evenly spaced points of training time, and at the end, its
policy answers the held-out problems greedily with the same code for both (`grpo_ext.evaluation.evaluate_accuracy`),
the evaluation's time kept out of the budget. Output (`--output_dir`): `learning.json`, `learning.png` (task metric
against training minutes) and a table of the metric at each mark, with the minutes each trainer took to reach the
level both reached.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METRIC = "pass@1/accuracy"  # the capability: the right product, in any form
TRAINERS = ("trl", "grpo-ext")


def held_out(num_problems: int):
    from grpo_ext.data import to_prompt_answer
    from grpo_ext.testing import make_multiplication_splits

    _, test = make_multiplication_splits(num_test=num_problems)
    return to_prompt_answer(test, instruction="End your reply with 'Answer: <number>'.")


def task_metrics(model, tokenizer, dataset, num_samples=1, temperature=0.7) -> dict:
    from grpo_ext.evaluation import evaluate_accuracy
    from reward_models import accuracy_reward, answer_line_reward

    was_training = model.training
    funcs = {"accuracy": accuracy_reward, "answer_line": answer_line_reward}
    try:
        return evaluate_accuracy(model, tokenizer, dataset, num_samples, 32, temperature, 64, reward_funcs=funcs)
    finally:
        model.train(was_training)


# --- One trainer within its budget (the worker process) ---


def run_worker(trainer_name: str, minutes: float, marks: int, seed: int, num_problems: int) -> dict:
    import torch
    from bench_step import REAL, common_config, real_workload
    from transformers import TrainerCallback

    model_path, dataset, reward_funcs, lora = real_workload(10_000)
    settings = common_config(REAL, steps=100_000, prompts_per_step=2, output_dir=tempfile.mkdtemp())
    settings.update(seed=seed, logging_steps=10_000)
    if trainer_name == "trl":
        from trl import GRPOConfig, GRPOTrainer

        trainer_cls, args = GRPOTrainer, GRPOConfig(**settings, shuffle_dataset=True, use_bias_correction_kl=False)
    else:
        from grpo_ext import GRPOExtConfig, GRPOExtTrainer

        trainer_cls, args = GRPOExtTrainer, GRPOExtConfig(**settings)
    evaluation_set, budget = held_out(num_problems), minutes * 60.0
    curve = []

    class WallClockBudget(TrainerCallback):
        """Training time only (evaluations excluded): evaluate at each mark, stop at the budget."""

        def __init__(self):
            self.trained, self.next_mark = 0.0, budget / marks

        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            self.evaluate(model, processing_class, state)
            self.since = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            self.trained += time.perf_counter() - self.since
            if self.trained >= self.next_mark or self.trained >= budget:
                self.next_mark += budget / marks
                self.evaluate(model, processing_class, state)
            control.should_training_stop = self.trained >= budget
            self.since = time.perf_counter()

        def evaluate(self, model, tokenizer, state):
            metrics = task_metrics(model, tokenizer, evaluation_set)
            curve.append({"minutes": self.trained / 60.0, "step": state.global_step, **metrics})
            print(f"[{trainer_name}] {self.trained / 60:.1f} min, step {state.global_step}: {metrics[METRIC]:.1%}",
                  file=sys.stderr, flush=True)  # fmt: skip

    torch.manual_seed(seed)
    trainer = trainer_cls(
        model_path, reward_funcs, args=args, train_dataset=dataset, peft_config=lora, callbacks=[WallClockBudget()]
    )
    trainer.train()
    return {"trainer": trainer_name, "seed": seed, "budget_minutes": minutes, "curve": curve}


def baseline(num_problems: int, k: int) -> dict:
    """The untrained model: greedy pass@1 and pass@k of k samples at the training temperature."""
    from grpo_ext.models import load_causal_lm, load_tokenizer
    from grpo_ext.testing import real_model_dir

    model = load_causal_lm(real_model_dir(), {"dtype": "float32"}, on_cpu=True)
    return task_metrics(model, load_tokenizer(real_model_dir()), held_out(num_problems), num_samples=k)


# --- Both trainers, the table and the plot ---


def reached(curve: list[dict], level: float) -> float | None:
    """The training minutes of the first mark at or above `level`."""
    return next((point["minutes"] for point in curve if point[METRIC] >= level - 1e-9), None)


def report(results: dict, output_dir: str) -> str:
    base, k = results["baseline"], results["k"]
    lines = [
        f"Untrained: greedy pass@1 {base[METRIC]:.1%}, pass@{k} {base[f'pass@{k}/accuracy']:.1%} "
        f"({k} samples at temperature 0.7), {base['num_problems']} held-out problems.",
        "",
        "| trainer | seed | steps | held-out pass@1 (accuracy) at each mark (training minutes) | final |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        points = ", ".join(f"{p[METRIC]:.1%} ({p['minutes']:.1f})" for p in run["curve"])
        lines.append(f"| {run['trainer']} | {run['seed']} | {run['curve'][-1]['step']} | {points} | "
                     f"{run['curve'][-1][METRIC]:.1%} |")  # fmt: skip
    for seed in sorted({run["seed"] for run in results["runs"]}):
        runs = {run["trainer"]: run for run in results["runs"] if run["seed"] == seed}
        level = min(max(p[METRIC] for p in run["curve"]) for run in runs.values())
        if level > base[METRIC]:
            times = ", ".join(f"{name} {reached(run['curve'], level):.1f} min" for name, run in runs.items())
            lines.append(f"\nSeed {seed}: time to {level:.1%} (the best level both reached): {times}.")
        else:
            lines.append(f"\nSeed {seed}: the trainers did not both rise above the untrained {base[METRIC]:.1%}.")
    text = "\n".join(lines)
    with open(os.path.join(output_dir, "learning.md"), "w") as file:
        file.write(text + "\n")
    try:
        plot(results, os.path.join(output_dir, "learning.png"))
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
    return text


def plot(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for run in results["runs"]:
        minutes = [p["minutes"] for p in run["curve"]]
        ax.plot(minutes, [p[METRIC] for p in run["curve"]], marker="o", label=f"{run['trainer']} (seed {run['seed']})")
    ax.axhline(results["baseline"][METRIC], color="grey", linestyle=":", label="untrained, greedy")
    ax.set_xlabel("training minutes (2 CPU cores; evaluations excluded)")
    ax.set_ylabel("held-out greedy pass@1 (accuracy)")
    ax.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each trainer")
    parser.add_argument("--marks", type=int, default=5, help="evaluations during training (and one before)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_problems", type=int, default=64)
    parser.add_argument("--k", type=int, default=8, help="samples per problem for the untrained model's pass@k")
    parser.add_argument("--output_dir", default="outputs/bench_learning")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    from grpo_ext.cpu import set_torch_threads

    set_torch_threads()
    if cli.worker:
        job = json.loads(cli.worker)
        print(json.dumps(run_worker(**job)))
        return
    os.makedirs(cli.output_dir, exist_ok=True)
    results = {"k": cli.k, "baseline": baseline(cli.num_problems, cli.k), "runs": []}
    for seed in cli.seeds:
        for trainer_name in TRAINERS if seed % 2 == 0 else reversed(TRAINERS):  # alternate who goes first
            job = dict(trainer_name=trainer_name, minutes=cli.minutes, marks=cli.marks, seed=seed,
                       num_problems=cli.num_problems)  # fmt: skip
            command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
            output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results["runs"].append(json.loads(output.strip().splitlines()[-1]))
    with open(os.path.join(cli.output_dir, "learning.json"), "w") as file:
        json.dump(results, file, indent=2)
    print(report(results, cli.output_dir))


if __name__ == "__main__":
    main()
