"""GRPO on math word problems, DeepSeekMath style (arXiv 2402.03300), with 4-bit QLoRA on one GPU.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/deepseek_math_style.py --config recipes/configs/qwen2.5-math-1.5b-gsm8k-24gb.yaml

Any field of the YAML can be overridden on the command line (`--learning_rate 2e-5`). The script reads top to
bottom: parse, data, model, rewards, trainer, evaluate, train (evaluating every eval_steps), save, evaluate, push. All algorithm lives in grpo_ext.
"""

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import PartialState
from transformers import set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.config import check_config_file_types
from grpo_ext.cpu import set_torch_threads
from grpo_ext.data import DEEPSEEKMATH_INSTRUCTION, R1_SYSTEM_PROMPT, load_split, to_prompt_answer
from grpo_ext.models import load_tokenizer
from reward_models import get_reward_funcs


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default="openai/gsm8k", metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet/.csv file."}
    )
    dataset_config: str | None = field(default="main", metadata={"help": "Dataset configuration (GSM8K: main)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_name: str | None = field(
        default=None, metadata={"help": "Dataset (or file) to evaluate on; defaults to dataset_name."}
    )
    dataset_test_split: str | None = field(default="test", metadata={"help": "Split to evaluate on; none to skip."})
    question_column: str | None = field(default=None, metadata={"help": "Question column (auto: question/problem)."})
    answer_column: str | None = field(default=None, metadata={"help": "Gold answer column (auto: answer/solution)."})
    instruction: str | None = field(
        default=DEEPSEEKMATH_INSTRUCTION, metadata={"help": "Appended to each question; empty for none."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message; 'r1' for DeepSeek-R1's <think>/<answer> format prompt."}
    )
    conversational: bool = field(default=True, metadata={"help": "Chat messages (True) or plain text prompts."})
    model_config_id: str | None = field(
        default=None,
        metadata={
            "help": "Model id whose config.json describes model_name_or_path, for `python -m grpo_ext.plan` before "
            "a local model folder is prepared (not used for training)."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Registry names (accuracy, format, tag_count, cosine, soft_overlong) or dotted paths."},
    )
    eval_before_training: bool = field(default=False, metadata={"help": "Evaluate the base model first."})
    eval_after_training: bool = field(default=True, metadata={"help": "Evaluate the trained model."})
    eval_max_problems: int | None = field(default=None, metadata={"help": "Evaluate on the first N problems only."})
    export: list[str] = field(
        default_factory=list,
        metadata={"help": "After training, export to output_dir/export: merged and / or gguf (grpo_ext.export)."},
    )


def main():
    # Parse: the YAML given with --config (its value types checked first), then command-line overrides
    check_config_file_types(sys.argv[1:], (ScriptArguments, GRPOExtConfig, ModelConfig))
    parser = TrlParser((ScriptArguments, GRPOExtConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    set_seed(training_args.seed)
    is_main = PartialState().is_main_process
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpo_ext").setLevel(logging.INFO)  # grpo-ext's one-time notes: threads, dtype, plan
    set_torch_threads()  # the cores this process may use, not every core of the machine

    # Data: prompt + answer columns
    system_prompt = R1_SYSTEM_PROMPT if script_args.system_prompt == "r1" else script_args.system_prompt
    shape = dict(
        instruction=script_args.instruction or None,
        system_prompt=system_prompt,
        conversational=script_args.conversational,
        question_column=script_args.question_column,
        answer_column=script_args.answer_column,
    )
    train_dataset = to_prompt_answer(
        load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split), **shape
    )
    test_dataset = None
    if script_args.dataset_test_split:
        test_name = script_args.dataset_test_name or script_args.dataset_name
        test_dataset = to_prompt_answer(
            load_split(test_name, script_args.dataset_config, script_args.dataset_test_split), **shape
        )
        if script_args.eval_max_problems:
            test_dataset = test_dataset.select(range(min(script_args.eval_max_problems, len(test_dataset))))

    # Model: 4-bit base (QLoRA) and LoRA adapter, from the model arguments
    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype,
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
    }
    if quantization_config is not None and torch.cuda.is_available():
        training_args.model_init_kwargs["device_map"] = {"": PartialState().local_process_index}
    tokenizer = load_tokenizer(model_args.model_name_or_path, {"revision": model_args.model_revision})

    # Rewards: registry names or dotted import paths
    reward_funcs = get_reward_funcs(
        script_args.reward_funcs,
        warn_unused=False,  # the run's lengths are offered to every factory; each takes what it needs
        max_len=training_args.max_completion_length,
        max_completion_len=training_args.max_completion_length,
        soft_punish_cache=training_args.max_completion_length // 4,
    )

    # Task metrics on the held-out set (eval_reward_funcs, 1.0 = correct): before and after training, and every
    # eval_steps when eval_strategy is set, where metric_for_best_model can keep the best checkpoint
    if test_dataset is not None and not training_args.eval_reward_funcs:
        training_args.eval_reward_funcs = ["accuracy"]

    # Trainer
    trainer = GRPOExtTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=test_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
    )

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
        return

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
        from grpo_ext.export import export_model

        export_model(training_args.output_dir, os.path.join(training_args.output_dir, "export"), script_args.export)

    # Push the adapter and its model card when asked (--push_to_hub --hub_model_id user/name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def save_resolved_config(output_dir, script_args, training_args, model_args):
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
    main()
