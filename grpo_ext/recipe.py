"""The recipe's set-up, shared by `recipes/deepseek_math_style.py` and `python -m grpo_ext.doctor`: its arguments, and
a trainer built from them.

`parse_recipe_args(argv)` reads a recipe YAML (`--config`, value types checked first) and command-line overrides into
`(ScriptArguments, GRPOExtConfig, ModelConfig)`; `build_trainer(script_args, training_args, model_args)` loads the data
(`prompt` + `answer` columns, the held-out split as `eval_dataset`), sets the model's loading arguments (4-bit base,
LoRA adapter), the tokenizer and the rewards (registry names or dotted paths), and returns the `GRPOExtTrainer` with
the held-out set. It does not evaluate, train, save or push: the recipe script does that, top to bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from reward_models import get_reward_funcs

from .config import GRPOExtConfig, check_config_file_types
from .data import DEEPSEEKMATH_INSTRUCTION, R1_SYSTEM_PROMPT, load_split, to_prompt_answer
from .models import load_tokenizer
from .trainer import GRPOExtTrainer


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
        metadata={
            "help": "Registry names (accuracy, answer_line, answer_format, format, tag_count, cosine, soft_overlong) "
            "or dotted paths."
        },
    )
    eval_before_training: bool = field(default=False, metadata={"help": "Evaluate the base model first."})
    eval_after_training: bool = field(default=True, metadata={"help": "Evaluate the trained model."})
    eval_max_problems: int | None = field(default=None, metadata={"help": "Evaluate on the first N problems only."})
    export: list[str] = field(
        default_factory=list,
        metadata={"help": "After training, export to output_dir/export: merged and / or gguf (grpo_ext.export)."},
    )


RECIPE_ARGUMENTS = (ScriptArguments, GRPOExtConfig, ModelConfig)


def parse_recipe_args(argv: list[str]) -> tuple[ScriptArguments, GRPOExtConfig, ModelConfig]:
    """The YAML given with `--config` (its value types checked first), then command-line overrides."""
    check_config_file_types(argv, RECIPE_ARGUMENTS)
    return TrlParser(RECIPE_ARGUMENTS).parse_args_and_config(argv)


def build_trainer(script_args: ScriptArguments, training_args: GRPOExtConfig, model_args: ModelConfig):
    """`(trainer, test_dataset)` of a recipe: data, model arguments, tokenizer, rewards, task metrics, trainer.
    `test_dataset` is None when `dataset_test_split` is empty."""
    set_seed(training_args.seed)

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
    return trainer, test_dataset
