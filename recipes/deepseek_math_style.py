"""GRPO on math word problems, DeepSeekMath style (arXiv 2402.03300), with 4-bit QLoRA on one GPU.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/deepseek_math_style.py --config recipes/configs/qwen2.5-math-1.5b-gsm8k-24gb.yaml

Any field of the YAML can be overridden on the command line (`--learning_rate 2e-5`). The script reads top to
bottom: parse, build (data, model, rewards, trainer: `grpo_ext.recipe`, shared with `python -m grpo_ext.doctor`),
evaluate, train (evaluating every eval_steps), evaluate, save, push. All algorithm lives in grpo_ext.
"""

import dataclasses
import json
import logging
import os
import sys

import yaml
from accelerate import PartialState

from grpo_ext.cpu import set_torch_threads
from grpo_ext.recipe import ScriptArguments, build_trainer, parse_recipe_args


def main():
    # Parse: the YAML given with --config (its value types checked first), then command-line overrides
    script_args, training_args, model_args = parse_recipe_args(sys.argv[1:])
    is_main = PartialState().is_main_process
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpo_ext").setLevel(logging.INFO)  # grpo-ext's one-time notes: threads, dtype, plan
    set_torch_threads()  # the cores this process may use, not every core of the machine

    # Build (grpo_ext.recipe): data (prompt + answer columns, the held-out split), model (4-bit base and LoRA adapter
    # from the model arguments), tokenizer, rewards (registry names or dotted paths), task metrics, the trainer
    trainer, test_dataset = build_trainer(script_args, training_args, model_args)

    def evaluate(stage):
        results = trainer.evaluate()
        if is_main:
            task = {key: value for key, value in results.items() if "@" in key}
            shown = ", ".join(f"{key.removeprefix('eval_')} {value:.1%}" for key, value in task.items())
            print(f"[{stage}] held-out task metrics on {int(results['eval_task_problems'])} problems: {shown}")
        return results

    results = {}
    if test_dataset is not None and script_args.eval_before_training:
        results["before"] = evaluate("before training")

    # Train (resumes from the latest checkpoint in output_dir when --resume_from_checkpoint is given)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.interrupted:  # SIGTERM / Ctrl-C: a checkpoint was saved in output_dir
        print("Interrupted: resume with --resume_from_checkpoint true")
        return trainer.interrupted_exit_code  # 143 after SIGTERM: a requeueing scheduler runs the job again

    # Evaluate what is delivered (the best checkpoint with load_best_model_at_end), logged at the last step
    if test_dataset is not None and script_args.eval_after_training:
        results["after"] = evaluate("after training")

    # Save: the adapter (or model), the tokenizer, the resolved config, the training state and curves
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if is_main:
        save_resolved_config(training_args.output_dir, script_args, training_args, model_args)
        save_curves(training_args.output_dir)
    if is_main and results:
        with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as file:
            json.dump(results, file, indent=2)
        if "before" in results and "after" in results:
            for name in training_args.eval_reward_funcs:
                before, after = results["before"][f"eval_pass@1/{name}"], results["after"][f"eval_pass@1/{name}"]
                print(
                    f"held-out pass@1 ({name}): {before:.1%} before -> {after:.1%} after GRPO ({after - before:+.1%})"
                )

    # Export: merged weights (QLoRA merged into the dequantised NF4 base) and / or GGUF, with the measured drift
    if is_main and script_args.export:
        from grpo_ext.export import ExportOptions, export_model

        options = ExportOptions(quant=script_args.export_quant)
        export_model(
            training_args.output_dir, os.path.join(training_args.output_dir, "export"), script_args.export, options
        )

    # Push the adapter and its model card when asked (--push_to_hub --hub_model_id user/name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def save_resolved_config(output_dir, script_args: ScriptArguments, training_args, model_args):
    """Every setting the run used, YAML, so the run can be repeated with --config (tokens left out)."""
    training = {k: v for k, v in training_args.to_dict().items() if "token" not in k}
    resolved = {**dataclasses.asdict(model_args), **dataclasses.asdict(script_args), **training}
    with open(os.path.join(output_dir, "resolved_config.yaml"), "w") as file:
        yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), file, sort_keys=False)


def save_curves(output_dir):
    try:
        from grpo_ext.plot import plot_training_curves
    except ImportError:
        return
    try:
        print(f"training curves: {plot_training_curves(output_dir)}")
    except ImportError as error:  # matplotlib missing: the run is still good
        print(f"no training curves: {error}")


if __name__ == "__main__":
    sys.exit(main())
