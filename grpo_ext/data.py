"""Loading prompt datasets, shaping them into GRPO's `prompt` (+ `answer`) columns, and checking the prompts.

GSM8K (`openai/gsm8k`, config `main`: `question`, `answer` ending in `#### n`) and MATH-style sets (`problem`,
`solution` with a `\\boxed{}` answer) map to the same two columns; local json / jsonl / parquet / csv files load
through `datasets` the same way.

`check_dataset` (columns, size, reward-function arguments, then `check_prompts` and `check_prompt_lengths`) runs at
trainer start, so a bad row is named before any model time is spent: every row of a map-style dataset, the first
`ITERABLE_ROWS_CHECKED` of an iterable one.

Streams (`datasets.IterableDataset`) follow TRL's rules (`check_streaming_settings`): no sampler can be attached to
them, so the sampler's order (each prompt `num_generations` times in a row, a generation batch served several times)
is built into the stream itself (`grouped_stream`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable

from datasets import Dataset, IterableDataset, load_dataset
from trl.trainer.utils import RepeatSampler, repeat_iterable_dataset

from .rollout import prompt_texts
from .vision import IMAGE_COLUMNS

logger = logging.getLogger(__name__)

# DeepSeekMath's chain-of-thought instruction (arXiv 2402.03300, section 2.3 and appendix).
DEEPSEEKMATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# DeepSeek-R1's format (arXiv 2501.12948, table 1), for the `format` reward.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
QUESTION_COLUMNS = ("question", "problem", "prompt", "query", "input")
ANSWER_COLUMNS = ("answer", "solution", "final_answer", "target", "output")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
ITERABLE_ROWS_CHECKED = 1000  # rows of an IterableDataset checked at start (reading it all would consume it)


def load_split(name_or_path: str, config: str | None = None, split: str = "train") -> Dataset:
    """A Hub dataset split, or a local data file (json / jsonl / parquet / csv), whose rows become that split."""
    extension = os.path.splitext(name_or_path)[1].lower()
    if extension in FILE_BUILDERS:
        return load_dataset(FILE_BUILDERS[extension], data_files={split: name_or_path}, split=split)
    return load_dataset(name_or_path, config, split=split)


def _pick(columns: list[str], preferred: str | None, candidates: tuple[str, ...], role: str) -> str:
    if preferred is not None:
        if preferred not in columns:
            raise ValueError(f"The {role} column {preferred!r} is not in the dataset (columns: {columns}).")
        return preferred
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"No {role} column found among {columns}; name it with --{role}_column (expected one of {candidates})."
    )


def to_prompt_answer(
    dataset: Dataset,
    instruction: str | None = DEEPSEEKMATH_INSTRUCTION,
    system_prompt: str | None = None,
    conversational: bool = True,
    question_column: str | None = None,
    answer_column: str | None = None,
) -> Dataset:
    """Columns `prompt` (chat messages, or text when `conversational=False`) and `answer` (the gold solution as
    given: the accuracy reward extracts `#### n` or `\\boxed{}` itself), and an `image` / `images` column as it is
    (TRL's vision-language columns: the trainer puts the images into the prompts)."""
    columns = list(dataset.column_names)
    question = _pick(columns, question_column, QUESTION_COLUMNS, "question")
    answer = _pick(columns, answer_column, ANSWER_COLUMNS, "answer")

    def shape(row):
        text = row[question] if not instruction else f"{row[question]}\n{instruction}"
        if not conversational:
            return {"prompt": text, "answer": str(row[answer])}
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"prompt": messages + [{"role": "user", "content": text}], "answer": str(row[answer])}

    kept = ("prompt", "answer", *IMAGE_COLUMNS)
    return dataset.map(shape, remove_columns=[c for c in columns if c not in kept])


def as_datasets(train_dataset, eval_dataset) -> tuple:
    """`as_dataset` on the trainer's train and eval sets (each of an eval dict, named `eval_dataset['name']`)."""
    if isinstance(eval_dataset, dict):
        eval_dataset = {key: as_dataset(value, f"eval_dataset[{key!r}]") for key, value in eval_dataset.items()}
    else:
        eval_dataset = as_dataset(eval_dataset, "eval_dataset")
    return as_dataset(train_dataset, "train_dataset"), eval_dataset


def as_dataset(dataset, name: str):
    """`dataset` as the trainer takes it: a `Dataset`, an `IterableDataset` or None as given, a plain list of row
    dicts turned into a `Dataset` (`Dataset.from_list`); anything else is refused naming `name` and the fix."""
    if dataset is None or isinstance(dataset, (Dataset, IterableDataset)):
        return dataset
    if isinstance(dataset, (list, tuple)):
        for row, value in enumerate(dataset):
            if not isinstance(value, dict):
                raise TypeError(
                    f"{name} is a list whose row {row} is {value!r} ({type(value).__name__}); a list dataset holds "
                    "one dict per row, e.g. [{'prompt': '1+1=', 'answer': '2'}, ...]."
                )
        return Dataset.from_list(list(dataset))
    raise TypeError(
        f"{name} is a {type(dataset).__name__}; pass a datasets.Dataset or IterableDataset (e.g. Dataset.from_list, "
        "Dataset.from_pandas, load_dataset(...)), or a list of row dicts."
    )


# --- Checking prompts ---


def first_rows(dataset: IterableDataset, limit: int = ITERABLE_ROWS_CHECKED) -> list[dict]:
    """The first `limit` rows of a stream (fewer if it ends sooner); reading on would consume it."""
    return list(itertools.islice(iter(dataset), limit))


def _kind(prompt) -> str:
    return "chat" if isinstance(prompt, list) else "text"


def _prompt_problem(prompt) -> str | None:
    """What is wrong with one prompt (None when nothing is): its type, emptiness or a chat role."""
    if isinstance(prompt, str):
        return "it is empty" if not prompt.strip() else None
    if not isinstance(prompt, list):
        return f"it is {prompt!r} ({type(prompt).__name__}), not a string or a list of chat messages"
    if not prompt:
        return "it is an empty list of messages"
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and "role" in message and "content" in message):
            return (
                f"message {i} is {message!r} ({type(message).__name__}); a chat prompt is a list of "
                '{"role": ..., "content": ...} dicts, e.g. [{"role": "user", "content": "What is 2+2?"}]'
            )
        if message["role"] not in CHAT_ROLES:
            return f"message {i} has role {message['role']!r}, not one of {CHAT_ROLES}"
        if not isinstance(message["content"], (str, list)) and message["content"] is not None:
            return f"message {i} has content {message['content']!r} ({type(message['content']).__name__})"
    if not any(
        isinstance(m["content"], str) and m["content"].strip() or isinstance(m["content"], list) for m in prompt
    ):
        return "every message is empty"
    return None


def check_prompts(prompts: Iterable, name: str, first_row: int = 0, first_kind: str | None = None) -> None:
    """Each prompt is a non-empty string, or a non-empty list of {"role", "content"} messages with known roles, and
    all rows are of one kind (text or chat). Raises `ValueError` naming the dataset, the row and the fix.
    `first_row`: the index of the first prompt given (a later stretch of a stream); `first_kind`: row 0's kind."""
    for row, prompt in enumerate(prompts, start=first_row):
        problem = _prompt_problem(prompt)
        if problem is not None:
            raise ValueError(
                f"{name} row {row}: the prompt is unusable: {problem}. A prompt is a non-empty string, or a list of "
                f"{{'role', 'content'}} messages with roles in {CHAT_ROLES}. Fix the row or drop it, e.g. "
                f"{name} = {name}.filter(lambda row, i: i != {row}, with_indices=True)."
            )
        kind = _kind(prompt)
        first_kind = first_kind or kind
        if kind != first_kind:
            raise ValueError(
                f"{name} row {row}: the prompt is {kind} but row 0 is {first_kind}; prompts of one dataset must all "
                "be plain text or all chat messages (a batch is rendered one way). Convert the rows to one kind."
            )


def check_prompt_lengths(
    prompts: list,
    name: str,
    tokenizer,
    max_positions: int | None,
    max_completion_length: int,
    max_prompt_length: int | None = None,
    chat_template_kwargs: dict | None = None,
    first_row: int = 0,
) -> None:
    """Prompt plus completion must fit the model's `max_positions`: with `max_prompt_length` None every prompt is
    counted (its text as the trainer tokenizes it) and a longer one raises naming its row (`first_row` + its
    position); with `max_prompt_length` set, prompts are cut to it at rollout, so only that it fits is checked.
    Cheap: a text of at most `limit - 1` UTF-8 bytes cannot exceed `limit` tokens, so only longer ones are
    tokenized."""
    if not max_positions:
        return
    limit = max_positions - max_completion_length
    if limit < 1:
        raise ValueError(
            f"max_completion_length={max_completion_length} leaves no room for a prompt in the model's "
            f"{max_positions} positions (max_position_embeddings). Lower max_completion_length."
        )
    if max_prompt_length is not None:
        if max_prompt_length > limit:
            raise ValueError(
                f"max_prompt_length={max_prompt_length} + max_completion_length={max_completion_length} exceeds the "
                f"model's {max_positions} positions (max_position_embeddings). Set max_prompt_length <= {limit}."
            )
        return
    texts = prompt_texts(prompts, tokenizer, chat_template_kwargs) if prompts else []
    long_rows = [row for row, text in enumerate(texts) if len(text.encode("utf-8")) + 1 > limit]
    if not long_rows:
        return
    lengths = [len(ids) for ids in tokenizer([texts[row] for row in long_rows], add_special_tokens=False)["input_ids"]]
    for row, length in zip(long_rows, lengths, strict=True):
        if length > limit:
            row += first_row
            raise ValueError(
                f"{name} row {row}: the prompt is {length} tokens, but the model's {max_positions} positions "
                f"(max_position_embeddings) minus max_completion_length={max_completion_length} leave {limit}. Shorten "
                f"or drop the row, lower max_completion_length, or set max_prompt_length={limit} to cut long prompts "
                "from the left (as TRL's max_prompt_length did)."
            )


def check_dataset(
    dataset, name: str, args, required_columns: dict[str, list[str]], tokenizer=None, max_positions=None
) -> None:
    """Columns, size and reward-function arguments (`required_columns`: function name -> the columns it takes), then
    every prompt: type, emptiness, chat roles, length."""
    if dataset is None:
        return
    streamed = isinstance(dataset, IterableDataset)
    rows = first_rows(dataset) if streamed else None
    # A stream's columns may be unknown until it is read; its size is known only when it ends within the rows read
    columns = list((dataset.column_names or (rows[0] if rows else [])) if streamed else dataset.column_names)
    num_rows = len(rows) if streamed else len(dataset)
    size_known = not streamed or num_rows < ITERABLE_ROWS_CHECKED
    if "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {columns}). Rename the column that holds the prompts, e.g. "
            "dataset = dataset.rename_column('question', 'prompt')."
        )
    prompts_per_rollout = args.generation_batch_size // args.num_generations
    if name == "train_dataset" and size_known and num_rows < prompts_per_rollout:
        raise ValueError(
            f"train_dataset {'streams only' if streamed else 'has'} {num_rows} prompts but one rollout takes "
            f"{prompts_per_rollout} "
            f"(generation_batch_size {args.generation_batch_size} / num_generations {args.num_generations}). "
            "Add prompts or lower per_device_train_batch_size / steps_per_generation."
        )
    _check_columns(columns, name, required_columns)
    for index, row in enumerate(rows or []):  # a stream's rows need not all have the same columns
        _check_row_columns(row, index, name, required_columns)
    prompts = [row["prompt"] for row in rows] if streamed else list(dataset["prompt"])
    check_prompts(prompts, name)
    if tokenizer is not None:
        check_prompt_lengths(
            prompts,
            name,
            tokenizer,
            max_positions,
            args.max_completion_length,
            args.max_prompt_length,
            args.chat_template_kwargs,
        )


def _check_columns(columns: list[str], where: str, required_columns: dict[str, list[str]]) -> None:
    """The columns each reward function takes (`required_columns`: function name -> columns) are among `columns`."""
    for func_name, needed in required_columns.items():
        missing = [column for column in needed if column not in columns]
        if missing:
            raise ValueError(
                f"Reward function '{func_name}' takes {missing} but {where} has no such column (columns: "
                f"{columns}). Add the column to the dataset or give the argument a default value."
            )


def _check_row_columns(row: dict, index: int, name: str, required_columns: dict[str, list[str]]) -> None:
    """One row of a stream has a prompt and the columns the reward functions take."""
    if "prompt" not in row:
        raise ValueError(f"{name} row {index} has no 'prompt' column (columns: {list(row)}).")
    _check_columns(list(row), f"{name} row {index}", required_columns)


def checked_stream(
    dataset: IterableDataset,
    name: str,
    args,
    required_columns: dict[str, list[str]],
    tokenizer=None,
    max_positions: int | None = None,
    checked_at_start: int = ITERABLE_ROWS_CHECKED,
) -> IterableDataset:
    """The stream with each row after the first `checked_at_start` (which `check_dataset` read at start) checked as
    it is read, with the same checks and messages: its prompt (type, emptiness, chat roles, the kind of row 0,
    length) and the columns the reward functions take. A row's index is its position in the stream as given."""
    first_kind = {}  # row 0's, read again at the start of each pass over the stream

    def check(row: dict, index: int) -> dict:
        if index == 0:
            first_kind["kind"] = _kind(row.get("prompt"))
        if index < checked_at_start:
            return row
        _check_row_columns(row, index, name, required_columns)
        check_prompts([row["prompt"]], name, first_row=index, first_kind=first_kind.get("kind"))
        if tokenizer is not None:
            check_prompt_lengths(
                [row["prompt"]], name, tokenizer, max_positions, args.max_completion_length,
                args.max_prompt_length, args.chat_template_kwargs, first_row=index,
            )  # fmt: skip
        return row

    return dataset.map(check, with_indices=True)


def check_eval_batch(args) -> None:
    """Evaluation groups must not be split across batches: the eval batch on all processes holds whole groups of
    `num_generations_eval` (None: `num_generations`) completions. With `eval_task_metrics_only` there is no
    evaluation rollout, so no group to keep whole."""
    if getattr(args, "eval_task_metrics_only", False):
        return
    group = args.num_generations_eval or args.num_generations
    name = "num_generations_eval" if args.num_generations_eval else "num_generations"
    if (args.per_device_eval_batch_size * args.world_size) % group:
        raise ValueError(
            f"per_device_eval_batch_size={args.per_device_eval_batch_size} x {args.world_size} process(es) is not "
            f"divisible by {name}={group}, so evaluation groups would be split. Set per_device_eval_batch_size to a "
            f"multiple of {group}, or {name} to a divisor of the global eval batch."
        )


# --- Streams (IterableDataset) ---


def is_streamed(dataset) -> bool:
    """True for an `IterableDataset`, or a dict of evaluation datasets holding one."""
    if isinstance(dataset, dict):
        return any(isinstance(value, IterableDataset) for value in dataset.values())
    return isinstance(dataset, IterableDataset)


def check_dispatch_batches(args) -> None:
    """A stream is read by every process (`dispatch_batches=False`): dispatching would collate each batch on the main
    process, and accelerate cannot concatenate the `prompt` column of strings or messages."""
    if args.accelerator_config.dispatch_batches:
        raise ValueError(
            "Iterable datasets require `dispatch_batches=False`, but it is set to `True` in `accelerator_config`. "
            "Please set it to `False`."
        )


def check_streaming_settings(args, train_dataset, eval_dataset) -> None:
    """TRL's rules when a dataset is a stream, applied to `args` before the trainer builds its accelerator: no batch
    dispatching (an error if asked for, else turned off); for a streamed `train_dataset`, `max_steps` set (a stream
    has no length), one dataloader worker (several would interleave their shards and split the groups of
    `num_generations` rows; overridden with TRL's warning), and no `dynamic_sampling` (it draws extra prompts by
    index)."""
    if not (is_streamed(train_dataset) or is_streamed(eval_dataset)):
        return
    check_dispatch_batches(args)
    args.accelerator_config.dispatch_batches = False
    if not isinstance(train_dataset, IterableDataset):
        return
    if args.max_steps <= 0:
        raise ValueError(  # the message transformers' Trainer gives TRL users, first
            "The train_dataset does not implement __len__, so the number of training steps cannot be inferred; "
            "max_steps has to be specified. The total number of steps must be known in advance to bound the "
            "training loop and to configure the learning rate scheduler. train_dataset is an IterableDataset (a "
            "stream): set max_steps to a positive value (GRPOExtConfig(max_steps=...))."
        )
    if args.dynamic_sampling:
        raise ValueError(
            "dynamic_sampling draws fresh prompts by index, which a streamed train_dataset (IterableDataset) cannot "
            "give. Set dynamic_sampling=False, or pass a map-style Dataset (e.g. Dataset.from_list(rows))."
        )
    if args.dataloader_num_workers != 0:
        logger.warning(
            "Iterable datasets require `dataloader_num_workers=0` to preserve prompt grouping; overriding the "
            f"provided value ({args.dataloader_num_workers})."
        )
        args.dataloader_num_workers = 0


def grouped_stream(
    dataset: IterableDataset,
    num_generations: int,
    prompts_per_batch: int = 1,
    repeat_count: int = 1,
    shuffle_seed: int | None = None,
) -> IterableDataset:
    """The stream in `RepeatSampler`'s order: batches of `prompts_per_batch` prompts, each prompt `num_generations`
    times in a row, each batch `repeat_count` times (a trailing incomplete batch is dropped, as the sampler drops
    it). With `shuffle_seed`, a buffered shuffle first: a stream's stand-in for the sampler's permutation."""
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    return repeat_iterable_dataset(dataset, num_generations, prompts_per_batch, repeat_count)


def collate_rows(features: list[dict]) -> list[dict]:
    """The trainer's data collator: a batch is the list of dataset rows, prompts are tokenized at rollout time. A module
    function, so dataloader worker processes (`dataloader_num_workers > 0`, spawn) can pickle it."""
    return features


def check_datasets(
    train_dataset, eval_dataset, args, columns: dict, tokenizer, tool_calling=None, placeholder=None
) -> None:
    """`check_dataset` on the train set and each eval set (a dict's too, named `eval_dataset['name']`) at trainer
    start: `columns["train"]` / `columns["eval"]` are the columns their rows need (name -> reader), and
    `columns["max_positions"]` the model's context. With tools or environments their own rules first; an
    environment's `placeholder` set (empty prompts its `reset` fills) is not checked."""
    datasets = [("train_dataset", train_dataset)]
    for split, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
        datasets.append((f"eval_dataset[{split!r}]" if split else "eval_dataset", dataset))
    for name, dataset in datasets:
        if tool_calling is not None:
            tool_calling.check_dataset(dataset, name)
        if dataset is not placeholder:
            needed = columns["train"] if name == "train_dataset" else columns["eval"]
            check_dataset(dataset, name, args, needed, tokenizer, columns["max_positions"])
    if eval_dataset is not None:
        check_eval_batch(args)


# --- In a trainer: each prompt G times in a row, one generation batch per rollout ---


class GroupedDataMixin:
    """The trainer's data loading: TRL's `RepeatSampler` (each prompt `num_generations` times in a row, a generation
    batch served `num_iterations x steps_per_generation` times) and its order built into streams (`grouped_stream`).
    Mixed into `GRPOExtTrainer`, which sets `num_generations`, `num_generations_eval` and `_stream_checks`."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self):
        # The same as Trainer's, except that one batch is a whole generation batch (steps_per_generation
        # micro-batches): _prepare_inputs rolls it out once and serves it slice by slice.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        return RepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        check_eval_batch(self.args)  # also for datasets given to evaluate() directly
        return RepeatSampler(data_source=eval_dataset, mini_repeat_count=self.num_generations_eval, seed=self.args.seed)

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        if not isinstance(dataset, IterableDataset):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        # A stream takes no sampler: the samplers' order is built into the stream, read by one worker on every process
        # (also for a stream given to evaluate() directly, which __init__ did not see)
        args, seed, checks = self.args, self.args.seed, self._stream_checks
        name = "train_dataset" if is_training else "eval_dataset"
        dataset = checked_stream(
            dataset, name, args, checks["train" if is_training else "eval"], self.processing_class,
            checks["max_positions"],
        )  # fmt: skip
        if is_training:
            dataset = grouped_stream(
                dataset,
                self.num_generations,
                args.generation_batch_size // self.num_generations,
                args.num_iterations * args.steps_per_generation,
                shuffle_seed=seed if args.shuffle_dataset else None,
            )
        else:
            check_eval_batch(args)
            dataset = grouped_stream(dataset, self.num_generations_eval, shuffle_seed=seed)
        check_dispatch_batches(args)
        self.accelerator.dataloader_config.dispatch_batches = False
        num_workers, args.dataloader_num_workers = args.dataloader_num_workers, 0
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        finally:
            args.dataloader_num_workers = num_workers
