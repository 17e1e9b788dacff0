"""Loading prompt datasets and shaping them into GRPO's `prompt` (+ `answer`) columns.

GSM8K (`openai/gsm8k`, config `main`: `question`, `answer` ending in `#### n`) and MATH-style sets (`problem`,
`solution` with a `\\boxed{}` answer) map to the same two columns; local json / jsonl / parquet / csv files load
through `datasets` the same way.
"""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset

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
    given: the accuracy reward extracts `#### n` or `\\boxed{}` itself)."""
    columns = list(dataset.column_names)
    question = _pick(columns, question_column, QUESTION_COLUMNS, "question")
    answer = _pick(columns, answer_column, ANSWER_COLUMNS, "answer")

    def shape(row):
        text = row[question] if not instruction else f"{row[question]}\n{instruction}"
        if not conversational:
            return {"prompt": text, "answer": str(row[answer])}
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"prompt": messages + [{"role": "user", "content": text}], "answer": str(row[answer])}

    return dataset.map(shape, remove_columns=[c for c in columns if c not in ("prompt", "answer")])
