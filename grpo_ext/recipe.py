"""The recipe's set-up, shared by `recipes/deepseek_math_style.py` and `python -m grpo_ext.doctor`: its arguments, and
a trainer built from them.

`parse_recipe_args(argv)` reads a recipe YAML (`--config`, its value types checked first: `check_config_file_types`)
and command-line overrides into `(ScriptArguments, GRPOExtConfig, ModelConfig)`, the training arguments checked by
every module (`settings.check_settings`) so that a bad value fails before anything loads; `build_trainer(script_args, training_args, model_args)` loads the data
(`prompt` + `answer` columns, the held-out split as `eval_dataset`), sets the model's loading arguments (4-bit base,
LoRA adapter), the tokenizer and the rewards (registry names or dotted paths), and returns the `GRPOExtTrainer` with
the held-out set. It does not evaluate, train, save or push: the recipe script does that, top to bottom.
"""

from __future__ import annotations

import enum
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from transformers import set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from reward_models import get_reward_funcs

from .config import GRPOExtConfig
from .data import DEEPSEEKMATH_INSTRUCTION, R1_SYSTEM_PROMPT, load_split, to_prompt_answer
from .models import load_tokenizer
from .settings import check_settings
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
    image_size: str | None = field(
        default=None,
        metadata={
            "help": "Vision-language recipes: HEIGHTxWIDTH of the images, from which `python -m grpo_ext.plan` counts "
            "the image tokens (default 448x448; not used for training: the processor sizes the images)."
        },
    )
    images_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Vision-language recipes: images per prompt, for `python -m grpo_ext.plan` (not used for training)."
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
    export_quant: str = field(
        default="f16",
        metadata={
            "help": "The exported GGUF file's weights: f16, q8_0 (no measurable cost on SmolLM2-135M), q5_0, q4_0."
        },
    )

    def __post_init__(self):
        from .export import FORMATS
        from .gguf_export import QUANTS

        unknown = [name for name in self.export if name not in FORMATS]
        if unknown:  # found now, not after training
            raise ValueError(f"export: {unknown} are not export formats; use any of {list(FORMATS)}.")
        if self.export_quant not in QUANTS:
            raise ValueError(
                f"export_quant={self.export_quant!r} is not a GGUF type written here; use one of {list(QUANTS)}."
            )


RECIPE_ARGUMENTS = (ScriptArguments, GRPOExtConfig, ModelConfig)


def parse_recipe_args(argv: list[str]) -> tuple[ScriptArguments, GRPOExtConfig, ModelConfig]:
    """The YAML given with `--config` (its value types checked first), then command-line overrides; the training
    arguments pass every module's check (`settings.check_settings`) before anything is loaded."""
    check_config_file_types(argv, RECIPE_ARGUMENTS)
    script_args, training_args, model_args = TrlParser(RECIPE_ARGUMENTS).parse_args_and_config(argv)
    check_settings(training_args)
    return script_args, training_args, model_args


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


# --- Value types of a config file (a recipe YAML), checked before anything is loaded ---

# `HfArgumentParser` converts command-line strings, but values from a YAML file reach the dataclasses as YAML typed
# them: `max_steps: 1.5` or `lora_target_modules: 5` pass the parser and fail much later. These accept more than their
# annotation says because their consumers do: `Trainer.train(resume_from_checkpoint=True)`.
EXTRA_ACCEPTED_TYPES = {"resume_from_checkpoint": (bool,)}
_BOOL_STRINGS = {"true", "false", "yes", "no", "1", "0", "y", "n", "t", "f"}


def _parses(convert, text: str) -> bool:
    try:
        convert(text)
    except ValueError:
        return False
    return True


def value_matches_type(value, hint) -> bool:
    """Whether `value` (as a YAML file gives it) is acceptable for a dataclass field annotated `hint`.

    Strings that the parser converts are accepted for numbers and booleans (`learning_rate: 1e-5` is a YAML string);
    a bare string for `list[str]` too (`lora_target_modules: all-linear`). Annotations not understood are accepted.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(value_matches_type(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        item = args[0] if args else Any
        if isinstance(value, str):
            return item is str
        return isinstance(value, (list, tuple)) and all(value_matches_type(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_STRINGS)
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and _parses(int, value)
        )
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and _parses(float, value)
        )
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in [member.value for member in hint]
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint) -> str:
    """A reader's name for an annotation: `int`, `a list of str`, `float or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(arg) for arg in args))
    if origin in (list, tuple, set):
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    return getattr(hint, "__name__", str(hint))


def check_config_types(values: dict, dataclass_types, source: str = "the config file") -> None:
    """Check each `name: value` of a config mapping against the annotation of the field of that name in
    `dataclass_types` (names no dataclass has are left to the parser). Raises `TypeError` naming the field, the value
    and the expected type, before any model or data is loaded."""
    hints = {}
    for cls in reversed(list(dataclass_types)):
        module = sys.modules.get(cls.__module__)
        hints.update(typing.get_type_hints(cls, vars(module) if module else None))
    for name, value in values.items():
        if name not in hints or value_matches_type(value, hints[name]):
            continue
        if isinstance(value, EXTRA_ACCEPTED_TYPES.get(name, ())):
            continue
        raise TypeError(
            f"{source}: {name} is {value!r} ({type(value).__name__}), but {name} takes {type_name(hints[name])}. "
            "Write a value of that type (in YAML, quote strings and give lists as [a, b])."
        )


def check_config_file_types(argv: list[str], dataclass_types) -> None:
    """`check_config_types` on the YAML file named by `--config` in `argv` (TrlParser's flag); nothing without one."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    import yaml

    path = argv[argv.index("--config") + 1]
    with open(path) as file:
        values = yaml.safe_load(file) or {}
    if isinstance(values, dict):
        check_config_types({k: v for k, v in values.items() if k != "env"}, dataclass_types, source=path)
