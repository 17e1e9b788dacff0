"""A script written for trl.GRPOTrainer runs with only its import line changed: a streamed dataset, reward functions
reading a column and logging a metric and a table column, the trainer's reward attributes."""

import subprocess
import sys
import textwrap

import pytest

from grpo_ext.testing import save_tiny_model

TRL_SCRIPT = textwrap.dedent(
    """
    {import_line}
    from grpo_ext.testing import make_prompt_dataset

    def exact_answer(completions, answer, **kwargs):  # reads the dataset's extra `answer` column
        return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]

    def short(completions, completion_ids, log_metric, log_extra, **kwargs):
        log_metric("mean_ids", sum(map(len, completion_ids)) / len(completion_ids))
        log_extra("num_ids", [len(ids) for ids in completion_ids])
        return [-len(ids) / 10 for ids in completion_ids]

    args = GRPOConfig(
        output_dir="{output_dir}",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=2,
        logging_steps=1,
        beta=0.04,
        loss_type="grpo",
        reward_weights=[1.0, 0.1],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model="{model_path}",  # a model id or a local path, as TRL users write it
        reward_funcs=[exact_answer, short],
        args=args,
        train_dataset=make_prompt_dataset(8).to_iterable_dataset(),  # a stream, as load_dataset(streaming=True) gives
    )
    trainer.train()
    print("REWARDS", trainer.reward_func_names, trainer.reward_weights.tolist())
    print("LOGGED", [0 <= entry["mean_ids"] <= 4 for entry in trainer.state.log_history if "mean_ids" in entry])
    print("TRAINED", type(trainer).__module__, trainer.state.global_step)
    """
)


@pytest.mark.parametrize(
    "import_line, module",
    [
        ("from trl import GRPOConfig, GRPOTrainer", "trl"),  # the script is genuine TRL code
        ("from grpo_ext import GRPOExtConfig as GRPOConfig, GRPOExtTrainer as GRPOTrainer", "grpo_ext"),
    ],
)
def test_trl_script_runs_with_one_import_changed(tmp_path, import_line, module):
    script = tmp_path / "train.py"
    model_path = save_tiny_model(tmp_path / "model")
    script.write_text(TRL_SCRIPT.format(import_line=import_line, output_dir=tmp_path / "out", model_path=model_path))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"TRAINED {module}" in result.stdout and result.stdout.strip().endswith(" 2")
    assert "REWARDS ['exact_answer', 'short'] [1.0, 0.10000000149011612]" in result.stdout
    assert "LOGGED [True, True]" in result.stdout  # the reward function's metric, logged at each of the 2 steps
