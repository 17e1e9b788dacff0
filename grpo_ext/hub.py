"""Pushing a GRPO-trained LoRA adapter to the Hugging Face Hub: the adapter, never the base weights, with a model card.

`Trainer.push_to_hub` uploads the whole output folder, which for a (Q)LoRA run can hold a pickled `training_args.bin`
(with `hub_token` in clear), optimizer state and, when the model was saved merged, gigabytes of base weights. Here the
upload is an explicit allow-list: the adapter, the tokenizer, a token-free training config, the model card and the
training curves.

    save_training_config(trainer.args, output_dir)
    push_adapter_to_hub(output_dir, "user/qwen-math-grpo-lora", token=...)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData

from .plot import CURVES_FILE, TRAINER_STATE_NAME, load_log_history

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_CONFIG = "training_config.json"
MODEL_CARD = "README.md"
CARD_MARKER = "<!-- grpo-ext model card -->"  # tells our card from PEFT's template `save_pretrained` writes

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)
# Human-readable run configs, first match wins. Never `training_args.bin`: it is a pickle holding hub_token in clear.
TRAINING_CONFIG_FILES = (TRAINING_CONFIG, "training_args.json", "resolved_config.yaml")

# Files that mean "full model weights": their presence without an adapter is a full model, which this module refuses.
FULL_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Hyperparameters shown in the card, in this order, when the run set them (GRPOExtConfig / GRPOConfig names).
KEY_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "max_prompt_length",
    "max_completion_length",
    "temperature",
    "loss_type",
    "beta",
    "kl_estimator",
    "reward_kl_coef",
    "epsilon",
    "epsilon_high",
    "num_iterations",
    "scale_rewards",
    "importance_sampling_level",
    "reward_weights",
    "seed",
)
ADAPTER_HYPERPARAMETERS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}

# Metrics reported in the card, from the last logged value of each.
KEY_METRICS = ("reward", "reward_std", "reward_shaped", "kl", "penalty/reward_kl", "entropy", "completions/mean_length")

DEEPSEEKMATH_BIBTEX = """@article{shao2024deepseekmath,
    title   = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
    author  = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and
               Y. K. Li and Y. Wu and Daya Guo},
    year    = 2024,
    eprint  = {arXiv:2402.03300},
}"""

TRL_BIBTEX = """@misc{vonwerra2020trl,
    title        = {{TRL: Transformer Reinforcement Learning}},
    author       = {Leandro von Werra and Younes Belkada and Lewis Tunstall and Edward Beeching and Tristan Thrush and
                    Nathan Lambert and Shengyi Huang and Kashif Rasul and Quentin Gallou{\\'e}dec},
    year         = 2020,
    journal      = {GitHub repository},
    publisher    = {GitHub},
    howpublished = {\\url{https://github.com/huggingface/trl}},
}"""


# --- Training config without secrets ---


def _is_secret_key(key: str) -> bool:
    """Field names that may hold a credential: `hub_token`, `token`, ... (every name containing "token"), secrets."""
    key = key.lower()
    return "token" in key or "secret" in key or "password" in key or "api_key" in key


def _without_secrets(value, secrets: set[str]):
    """`value` with secret-named keys removed at any depth (`model_init_kwargs={"token": ...}` too) and any string
    equal to a known secret replaced, so a token copied into an unrelated field does not leak either."""
    if isinstance(value, dict):
        return {k: _without_secrets(v, secrets) for k, v in value.items() if not _is_secret_key(str(k))}
    if isinstance(value, (list, tuple)):
        return [_without_secrets(v, secrets) for v in value]
    if isinstance(value, str) and value in secrets:
        return "<redacted>"
    return value


def training_config_dict(args) -> dict:
    """The run's settings as a JSON-ready dict with every token-like field removed (see `_is_secret_key`)."""
    secrets = {s for s in (getattr(args, "hub_token", None), os.environ.get("HF_TOKEN")) if isinstance(s, str) and s}
    return _without_secrets(json.loads(args.to_json_string()), secrets)


def save_training_config(args, output_dir: str | os.PathLike) -> str:
    """Write `training_config.json` (the `TrainingArguments`, tokens stripped) into `output_dir`; return its path.

    `Trainer` saves its arguments only as the pickle `training_args.bin`, which holds `hub_token` in clear and is not
    readable without the exact class; this JSON is what gets pushed instead.
    """
    path = os.path.join(os.fspath(output_dir), TRAINING_CONFIG)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(training_config_dict(args), file, indent=2, sort_keys=True)
    return path


# --- Model card ---


def key_hyperparameters(training_config: dict, adapter_config: dict | None = None) -> dict:
    """The settings worth a line in the card (`KEY_HYPERPARAMETERS` and the LoRA rank/alpha), in a stable order."""
    chosen = {name: training_config[name] for name in KEY_HYPERPARAMETERS if training_config.get(name) is not None}
    if chosen.get("max_steps") is not None and chosen["max_steps"] > 0:
        chosen.pop("num_train_epochs", None)  # max_steps overrides epochs: showing both misleads
    elif chosen.get("max_steps") is not None:
        chosen.pop("max_steps")  # -1: train by epochs
    for name, shown_as in ADAPTER_HYPERPARAMETERS.items():
        if adapter_config and adapter_config.get(name) is not None:
            chosen[shown_as] = adapter_config[name]
    if adapter_config and adapter_config.get("target_modules"):
        modules = adapter_config["target_modules"]
        chosen["lora_target_modules"] = modules if isinstance(modules, str) else sorted(modules)
    return chosen


def final_metrics(log_history: list[dict]) -> dict:
    """The last logged value of each `KEY_METRICS` and `rewards/<func>/mean`, and the number of optimizer steps."""
    metrics = {}
    for entry in log_history:
        for name, value in entry.items():
            wanted = name in KEY_METRICS or (name.startswith("rewards/") and name.endswith("/mean"))
            if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = value
    steps = [entry["step"] for entry in log_history if "step" in entry]
    if metrics and steps:
        metrics["global_step"] = max(steps)
    return metrics


def reward_names(log_history: list[dict]) -> list[str]:
    """Reward function names as logged under `rewards/<name>/mean`, in first-logged order."""
    names = {}
    for entry in log_history:
        for key in entry:
            if key.startswith("rewards/") and key.endswith("/mean"):
                names[key[len("rewards/") : -len("/mean")]] = None
    return list(names)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict, header: tuple[str, str]) -> str:
    """A two-column markdown table; `|` in values is escaped so a value cannot break the table."""
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| `{name}` | {_escape_cell(_format_value(value))} |" for name, value in rows.items()]
    return "\n".join(lines)


def _is_hub_id(base_model: str | None) -> bool:
    """Only a Hub id may go in the card's `base_model` metadata; a local path would be rejected by the Hub."""
    if not base_model or os.path.isabs(base_model) or base_model.startswith((".", "~")) or os.path.isdir(base_model):
        return False
    return base_model.count("/") <= 1


def _load_instructions(base_model: str | None, repo_id: str, adapter: bool) -> str:
    base = base_model or "BASE_MODEL_ID"
    if not adapter:
        return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```"""
    return f"""This repository holds only the LoRA adapter: the base model's weights are loaded from `{base}`.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

or in one call, reading the base model's id from `adapter_config.json`:

```python
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")
```

To serve it without PEFT, merge the adapter into the base weights: `model = model.merge_and_unload()`."""


def build_model_card(
    base_model: str | None,
    datasets: str | list[str] | None,
    reward_funcs: list[str] | None,
    hyperparameters: dict,
    final_metrics: dict,
    curves_png: str | None,
    repo_id: str,
    adapter: bool = True,
) -> str:
    """The README.md of a GRPO-trained model: YAML metadata the Hub indexes, then what a user needs to trust and load it.

    Args:
        base_model: Hub id (or local path, then kept out of the metadata) of the model the adapter applies to.
        datasets: the training dataset id(s).
        reward_funcs: names of the reward functions, as in the logged `rewards/<name>/mean`.
        hyperparameters: settings to show (see `key_hyperparameters`); secret-named keys are dropped.
        final_metrics: last logged metrics (see `final_metrics`).
        curves_png: path of the training-curves image; the card embeds it by file name, uploaded next to the card.
        repo_id: the Hub repository the card is for, used in the loading code.
        adapter: False for a full model (library `transformers`, loaded without PEFT).
    """
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    tags = ["grpo", "grpo-ext", "trl", "peft", "lora"] if adapter else ["grpo", "grpo-ext", "trl"]
    metadata = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="peft" if adapter else "transformers",
        tags=tags,
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    name = repo_id.split("/")[-1]
    what = "a LoRA adapter" if adapter else "a model"
    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        CARD_MARKER,
        f"# {name}",
        f"This is {what} for `{base_model or 'an unrecorded base model'}` fine-tuned with **GRPO** (Group Relative "
        "Policy Optimization, [DeepSeekMath](https://arxiv.org/abs/2402.03300)) using "
        "`grpo-ext` on top of [TRL](https://github.com/huggingface/trl).",
        "## Training",
        "\n".join(
            [
                f"- **Base model:** `{base_model or 'unknown'}`",
                f"- **Datasets:** {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}",
                "- **Reward functions:** "
                + (", ".join(f"`{r}`" for r in reward_funcs) if reward_funcs else "not recorded"),
            ]
        ),
    ]
    hyperparameters = _without_secrets(dict(hyperparameters or {}), set())
    if hyperparameters:
        sections += ["### Hyperparameters", _table(hyperparameters, ("hyperparameter", "value"))]
    if final_metrics:
        sections += [
            "### Final metrics",
            "Last logged value of each training metric.",
            _table(final_metrics, ("metric", "value")),
        ]
    if curves_png:
        sections += ["### Training curves", f"![Training curves]({os.path.basename(curves_png)})"]
    sections += ["## How to load", _load_instructions(base_model, repo_id, adapter)]
    sections += [
        "## Citations",
        "GRPO was introduced in DeepSeekMath:",
        f"```bibtex\n{DEEPSEEKMATH_BIBTEX}\n```",
        "TRL:",
        f"```bibtex\n{TRL_BIBTEX}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def model_card_for_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    reward_funcs: list[str] | None = None,
    training_config: dict | None = None,
    log_history: list[dict] | None = None,
) -> str:
    """`build_model_card` with every argument not given read from the files a run leaves in `output_dir`.

    The base model from `adapter_config.json`, hyperparameters from `training_config.json`, final metrics and reward
    names from `trainer_state.json`, the curves from `training_curves.png`. The trainer passes what it knows live.
    """
    output_dir = os.fspath(output_dir)
    adapter_config = _read_json(os.path.join(output_dir, ADAPTER_CONFIG))
    if training_config is None:
        training_config = _read_json(os.path.join(output_dir, TRAINING_CONFIG)) or {}
    if log_history is None:
        has_state = os.path.isfile(os.path.join(output_dir, TRAINER_STATE_NAME))
        log_history = load_log_history(output_dir) if has_state else []
    if base_model is None and adapter_config:
        base_model = adapter_config.get("base_model_name_or_path")
    curves = os.path.join(output_dir, CURVES_FILE)
    return build_model_card(
        base_model=base_model,
        datasets=datasets,
        reward_funcs=reward_funcs if reward_funcs is not None else reward_names(log_history),
        hyperparameters=key_hyperparameters(training_config, adapter_config),
        final_metrics=final_metrics(log_history),
        curves_png=curves if os.path.isfile(curves) else None,
        repo_id=repo_id,
        adapter=adapter_config is not None,
    )


# --- Upload ---


def _check_is_adapter(output_dir: str) -> None:
    """Refuse a folder without a saved adapter, explaining how to push a full model instead."""
    present = lambda name: os.path.isfile(os.path.join(output_dir, name))  # noqa: E731
    if present(ADAPTER_CONFIG) and present(ADAPTER_WEIGHTS):
        return
    full_model = any(present(name) for name in FULL_MODEL_FILES) or any(
        name.startswith(("model-", "pytorch_model-")) for name in os.listdir(output_dir)
    )
    if full_model:
        raise ValueError(
            f"{output_dir} holds full model weights, not a LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}): "
            "push_adapter_to_hub uploads adapters only, so it never publishes base weights by accident. To push a "
            "full (or merged) model, use `model.push_to_hub(repo_id)` and `tokenizer.push_to_hub(repo_id)`. Do not "
            "upload the whole output folder: it also holds checkpoints, optimizer states and run files that are not "
            "part of the model."
        )
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not present(name)]
    raise ValueError(
        f"{output_dir} has no LoRA adapter: {missing} missing. Save one with `peft_model.save_pretrained(output_dir)` "
        "(or `trainer.save_model()` after training with a peft_config)."
    )


def adapter_upload_files(output_dir: str | os.PathLike) -> list[str]:
    """File names in `output_dir` that `push_adapter_to_hub` uploads (the card excepted), in upload order."""
    output_dir = os.fspath(output_dir)
    _check_is_adapter(output_dir)
    present = lambda name: os.path.isfile(os.path.join(output_dir, name))  # noqa: E731
    files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    files += [name for name in TOKENIZER_FILES if present(name)]
    files += [name for name in TRAINING_CONFIG_FILES if present(name)][:1]
    files += [CURVES_FILE] if present(CURVES_FILE) else []
    return files


def _contains(path_or_bytes, needle: bytes, chunk_size: int = 1 << 20) -> bool:
    """Whether `needle` occurs in a file (read in chunks, overlapping so a match across chunks is found) or bytes."""
    if isinstance(path_or_bytes, bytes):
        return needle in path_or_bytes
    tail = b""
    with open(path_or_bytes, "rb") as file:
        while chunk := file.read(chunk_size):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def _check_no_token(operations: list[CommitOperationAdd], token: str | None) -> None:
    """Last line of defence: refuse to upload a file that contains the token (named by file, never by value)."""
    if not isinstance(token, str) or not token:
        return
    leaking = [op.path_in_repo for op in operations if _contains(op.path_or_fileobj, token.encode())]
    if leaking:
        raise ValueError(
            f"Refusing to upload: {leaking} contain the Hub token. Remove it (save_training_config strips token "
            "fields) and push again; consider revoking the token if these files were shared."
        )


def _model_card(output_dir: str, repo_id: str, model_card: str | None) -> str:
    """The card to upload: the one given, else a grpo-ext card already in the folder, else one built from the folder.

    A README.md without our marker is PEFT's empty template (written by every `save_pretrained`) or transformers'
    generic card; it is replaced rather than published.
    """
    if model_card is not None:
        return model_card
    path = os.path.join(output_dir, MODEL_CARD)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            existing = file.read()
        if CARD_MARKER in existing:
            return existing
    return model_card_for_output_dir(output_dir, repo_id)


def push_adapter_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload LoRA adapter trained with GRPO (grpo-ext)",
    api: HfApi | None = None,
    *,
    model_card: str | None = None,
    revision: str | None = None,
):
    """Upload a saved LoRA adapter with its tokenizer, config, card and curves to `repo_id`, in one commit.

    Only an allow-list of files goes up (see `adapter_upload_files`): never base weights, optimizer states or the
    pickled `training_args.bin`. Raises `ValueError` for a folder holding a full model instead of an adapter.

    Args:
        output_dir: folder written by `peft_model.save_pretrained` / `trainer.save_model` (an output or checkpoint dir).
        repo_id: `user/name` (or `name`, in the token owner's namespace); created if missing.
        token: Hub token with write access; defaults to the locally saved one. Never logged.
        private: visibility of a newly created repository; ignored if it exists.
        commit_message: summary of the commit.
        api: the `HfApi` to use (tests inject one that records calls instead of reaching the Hub).
        model_card: README.md text; defaults to a grpo-ext card in the folder, else one built from the folder.
        revision: branch to commit to (default: main).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    output_dir = os.fspath(output_dir)
    files = adapter_upload_files(output_dir)
    api = api if api is not None else HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    card = _model_card(output_dir, repo_id, model_card)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(output_dir, name)) for name in files
    ]
    operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD, path_or_fileobj=card.encode("utf-8")))
    _check_no_token(operations, token)
    logger.info("Pushing %s to %s", [op.path_in_repo for op in operations], repo_id)
    return api.create_commit(
        repo_id, operations=operations, commit_message=commit_message, token=token, revision=revision
    )


# --- Uploads during training ---


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says what stays on disk and how to push it again."""


class CheckpointUploads:
    """Checkpoint uploads in a background thread, so a slow or unreachable Hub neither blocks nor stops training.

    One upload at a time, in save order. A failure is logged as a warning and training goes on; `finish()` (at the
    end of training) waits for the uploads still running and retries the newest checkpoint once if its upload failed
    (each checkpoint push replaces the previous one in the repository, so the newest is the one that matters).
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._last_failed: tuple[str, Callable] | None = None  # (folder, upload) when the newest upload failed

    def busy(self) -> bool:
        return any(not future.done() for future in self._futures)

    def submit(self, folder: str, upload: Callable[[], object]) -> None:
        """Run `upload()` (which pushes `folder`) in the background."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-ext-upload")
        self._futures = [future for future in self._futures if not future.done()]
        self._futures.append(self._executor.submit(self._run, folder, upload))

    def _run(self, folder: str, upload: Callable[[], object]) -> None:
        try:
            upload()
            self._last_failed = None
        except Exception as error:
            self._last_failed = (folder, upload)
            logger.warning(
                "Uploading %s to the Hub failed (%s: %s). Training goes on; the upload is retried once at the end of "
                "training.",
                folder,
                type(error).__name__,
                error,
            )

    def finish(self) -> bool:
        """Wait for the uploads left, retry the newest once if it failed; True when nothing is left failed."""
        for future in self._futures:
            future.result()
        self._futures = []
        if self._last_failed is None:
            return True
        folder, upload = self._last_failed
        self._last_failed = None
        if not os.path.isdir(folder):
            logger.warning("Not retrying the upload of %s: the folder was deleted (save_total_limit).", folder)
            return False
        try:
            upload()
        except Exception as error:
            logger.warning(
                "Retrying the upload of %s failed too (%s: %s). The checkpoint is intact on disk; push the result "
                "later with trainer.push_to_hub(), or push_adapter_to_hub(folder, repo_id).",
                folder,
                type(error).__name__,
                error,
            )
            return False
        logger.info("Retried upload of %s succeeded.", folder)
        return True
