"""Pushing a GRPO-trained LoRA adapter to the Hugging Face Hub: the adapter, never the base weights, with a model card.

`Trainer.push_to_hub` uploads the whole output folder, which for a (Q)LoRA run can hold a pickled `training_args.bin`
(with `hub_token` in clear), optimizer state and, when the model was saved merged, gigabytes of base weights. Here the
upload is an explicit allow-list: the adapter, the tokenizer, a token-free training config, the model card (rendered
from templates/model_card.md) and the training curves.

    save_training_config(trainer.args, output_dir)
    push_adapter_to_hub(output_dir, "user/qwen-math-grpo-lora", token=...)

With `log_completions_hub_repo`, the completions tables (completions.py) go to a Hub *dataset* repository while
training runs: `start_completions_uploads` creates it with a card and uploads new parquet files every 2 minutes in the
background; `finish_completions_uploads` pushes the last ones at the end of training.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitScheduler,
    DatasetCard,
    DatasetCardData,
    HfApi,
    ModelCard,
    ModelCardData,
)

from .config import is_secret_key
from .plot import CURVES_FILE, TRAINER_STATE_NAME, load_log_history, plot_training_curves

logger = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAINING_CONFIG = "training_config.json"
MODEL_CARD = "README.md"
CARD_MARKER = "<!-- grpo-ext model card -->"  # tells our card from PEFT's template `save_pretrained` writes
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
COMPLETIONS_CARD_TEMPLATE = Path(__file__).parent / "templates" / "completions_dataset_card.md"
COMPLETIONS_UPLOAD_MINUTES = 2  # as TRL's log_completions_hub_repo

TOKENIZER_FILES = tuple(
    "tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json chat_template.jinja "
    "chat_template.json vocab.json vocab.txt merges.txt tokenizer.model".split()
)
# Human-readable run configs, first match wins. Never `training_args.bin`: it is a pickle holding hub_token in clear.
TRAINING_CONFIG_FILES = (TRAINING_CONFIG, "training_args.json", "resolved_config.yaml")
# File names that mean full model weights (single file, index or shard): without an adapter, the push is refused.
FULL_MODEL_PREFIXES = ("model.safetensors", "model-", "pytorch_model")

# Hyperparameters shown in the card, in this order, when the run set them (GRPOExtConfig / GRPOConfig names).
KEY_HYPERPARAMETERS = tuple(
    "learning_rate lr_scheduler_type num_train_epochs max_steps per_device_train_batch_size gradient_accumulation_steps "
    "num_generations max_prompt_length max_completion_length temperature loss_type beta kl_estimator reward_kl_coef "
    "epsilon epsilon_high num_iterations scale_rewards importance_sampling_level reward_weights seed".split()
)
ADAPTER_HYPERPARAMETERS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}
# Metrics reported in the card, from the last logged value of each (and of every `rewards/<func>/mean`).
KEY_METRICS = ("reward", "reward_std", "reward_shaped", "kl", "penalty/reward_kl", "entropy", "completions/mean_length")


# --- Training config without secrets ---


def _without_secrets(value, secrets: set[str]):
    """`value` with secret-named keys removed at any depth (`model_init_kwargs={"token": ...}` too) and any string
    equal to a known secret replaced, so a token copied into an unrelated field does not leak either."""
    if isinstance(value, dict):
        return {k: _without_secrets(v, secrets) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [_without_secrets(v, secrets) for v in value]
    return "<redacted>" if isinstance(value, str) and value in secrets else value


def training_config_dict(args) -> dict:
    """The run's settings as a JSON-ready dict, every token-like field removed and the token's value redacted."""
    secrets = {s for s in (getattr(args, "hub_token", None), os.environ.get("HF_TOKEN")) if isinstance(s, str) and s}
    return _without_secrets(json.loads(args.to_json_string()), secrets)


def save_training_config(args, output_dir: str | os.PathLike) -> str:
    """Write `training_config_dict(args)` as `output_dir`/training_config.json (pushed instead of the pickle
    `training_args.bin`, which holds `hub_token` in clear); return its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.fspath(output_dir), TRAINING_CONFIG)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(training_config_dict(args), file, indent=2, sort_keys=True)
    return path


def save_card_assets(args, output_dir: str | os.PathLike) -> None:
    """What the card shows next to the adapter: `training_config.json` and, with matplotlib, the training curves."""
    save_training_config(args, output_dir)
    try:
        plot_training_curves(output_dir)
    except (ImportError, ValueError) as error:  # no matplotlib, or nothing logged yet: push without curves
        logger.info(f"no training curves: {error}")


# --- Model card ---


def _key_hyperparameters(training_config: dict, adapter_config: dict | None) -> dict:
    """`KEY_HYPERPARAMETERS` the run set and the LoRA settings, in a stable order."""
    chosen = {name: training_config[name] for name in KEY_HYPERPARAMETERS if training_config.get(name) is not None}
    # max_steps > 0 overrides epochs (showing both misleads); -1 means training by epochs
    chosen.pop("num_train_epochs" if chosen.get("max_steps", -1) > 0 else "max_steps", None)
    adapter_config = adapter_config or {}
    for name, shown_as in ADAPTER_HYPERPARAMETERS.items():
        if adapter_config.get(name) is not None:
            chosen[shown_as] = adapter_config[name]
    if modules := adapter_config.get("target_modules"):
        chosen["lora_target_modules"] = modules if isinstance(modules, str) else sorted(modules)
    return chosen


def _final_metrics(log_history: list[dict]) -> dict:
    """The last logged value of each `KEY_METRICS` and `rewards/<func>/mean`, and the number of optimizer steps."""
    wanted = lambda name: name in KEY_METRICS or name.startswith("rewards/") and name.endswith("/mean")  # noqa: E731
    metrics = {
        name: value
        for entry in log_history
        for name, value in entry.items()
        if wanted(name) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    steps = [entry["step"] for entry in log_history if "step" in entry]
    return {**metrics, "global_step": max(steps)} if metrics and steps else metrics


def _cell(value) -> str:
    """A markdown table cell: floats to 4 digits, lists comma-separated, `|` escaped so it cannot break the table."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return (f"{value:.4g}" if isinstance(value, float) else str(value)).replace("|", "\\|").replace("\n", " ")


def _is_hub_id(name: str | None) -> bool:
    """Only a Hub id may go in the card's `base_model` metadata; a local path would be rejected by the Hub."""
    local = not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name)
    return not local and name.count("/") <= 1


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
    """The README.md of a GRPO-trained adapter (or full model) from templates/model_card.md. A local `base_model`
    path stays out of the metadata, secret-named `hyperparameters` out of the card; the curves go by file name."""
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    card_data = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="peft" if adapter else "transformers",
        tags=["grpo", "grpo-ext", "trl", "peft", "lora"] if adapter else ["grpo", "grpo-ext", "trl"],
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        marker=CARD_MARKER,
        repo_id=repo_id,
        adapter=adapter,
        base_model=base_model,
        datasets=datasets,
        reward_funcs=reward_funcs,
        hyperparameters={k: _cell(v) for k, v in _without_secrets(dict(hyperparameters or {}), set()).items()},
        final_metrics={k: _cell(v) for k, v in (final_metrics or {}).items()},
        curves_png=os.path.basename(curves_png) if curves_png else None,
    )
    return f"{card}\n"  # Jinja drops the template's final newline


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


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
    """`build_model_card` with what is not given read from the run's files in `output_dir`: the base model from
    `adapter_config.json`, hyperparameters from `training_config.json`, final metrics and reward names from
    `trainer_state.json`, the curves from `training_curves.png`. The trainer passes what it knows live."""
    output_dir = os.fspath(output_dir)
    adapter_config = _read_json(Path(output_dir, ADAPTER_CONFIG))
    if training_config is None:
        training_config = _read_json(Path(output_dir, TRAINING_CONFIG)) or {}
    if log_history is None:
        has_state = os.path.isfile(os.path.join(output_dir, TRAINER_STATE_NAME))
        log_history = load_log_history(output_dir) if has_state else []
    if reward_funcs is None:  # as logged: rewards/<name>/mean
        logged = (key for entry in log_history for key in entry if key.startswith("rewards/") and key.endswith("/mean"))
        reward_funcs = list(dict.fromkeys(key[len("rewards/") : -len("/mean")] for key in logged))
    curves = os.path.join(output_dir, CURVES_FILE)
    return build_model_card(
        base_model=base_model or (adapter_config or {}).get("base_model_name_or_path"),
        datasets=datasets,
        reward_funcs=reward_funcs,
        hyperparameters=_key_hyperparameters(training_config, adapter_config),
        final_metrics=_final_metrics(log_history),
        curves_png=curves if os.path.isfile(curves) else None,
        repo_id=repo_id,
        adapter=adapter_config is not None,
    )


# --- Upload ---


def adapter_upload_files(output_dir: str | os.PathLike) -> list[str]:
    """File names in `output_dir` that `push_adapter_to_hub` uploads (the card excepted), in upload order; a
    `ValueError` for a folder without a saved adapter, explaining how to push a full model instead."""
    output_dir = os.fspath(output_dir)
    present = lambda name: os.path.isfile(os.path.join(output_dir, name))  # noqa: E731
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not present(name)]
    if missing and any(name.startswith(FULL_MODEL_PREFIXES) for name in os.listdir(output_dir)):
        raise ValueError(
            f"{output_dir} holds full model weights, not a LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}): "
            "push_adapter_to_hub uploads adapters only, so it never publishes base weights by accident. To push a "
            "full (or merged) model, use `model.push_to_hub(repo_id)` and `tokenizer.push_to_hub(repo_id)`. Do not "
            "upload the whole output folder: it also holds checkpoints, optimizer states and run files that are not "
            "part of the model."
        )
    if missing:
        raise ValueError(
            f"{output_dir} has no LoRA adapter: {missing} missing. Save one with `peft_model.save_pretrained("
            "output_dir)` (or `trainer.save_model()` after training with a peft_config)."
        )
    config = [name for name in TRAINING_CONFIG_FILES if present(name)][:1]  # the first one present
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS, *filter(present, (*TOKENIZER_FILES, *config, CURVES_FILE))]


def _contains(data: str | bytes, needle: bytes) -> bool:
    """Whether `needle` occurs in bytes or in a file (memory-mapped: adapter weights are not read into memory)."""
    if isinstance(data, bytes) or not os.path.getsize(data):  # mmap refuses empty files
        return isinstance(data, bytes) and needle in data
    with open(data, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return mapped.find(needle) != -1


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
    """Upload the `adapter_upload_files` of `output_dir` and a card to `repo_id` (created if missing, `private` if
    new) in one commit; return its `CommitInfo`. A file holding `token` (never logged) stops the push. `model_card`
    defaults to a grpo-ext card in the folder (one without `CARD_MARKER` is PEFT's placeholder), else one built from
    the folder. `api`: the `HfApi` to use (tests record its calls)."""
    output_dir = os.fspath(output_dir)
    files = adapter_upload_files(output_dir)
    api = api if api is not None else HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    if model_card is None:
        card = Path(output_dir, MODEL_CARD)
        model_card = card.read_text("utf-8") if card.is_file() else ""
        model_card = model_card if CARD_MARKER in model_card else model_card_for_output_dir(output_dir, repo_id)
    uploads = {name: os.path.join(output_dir, name) for name in files} | {MODEL_CARD: model_card.encode("utf-8")}
    return _commit_uploads(api, repo_id, uploads, token, commit_message, revision)


def _commit_uploads(api: HfApi, repo_id: str, uploads: dict, token, commit_message: str, revision=None):
    """One commit of `uploads` (path in repo -> file path or bytes) to `repo_id`; refused when any holds `token`."""
    needle = token.encode() if isinstance(token, str) and token else None
    if needle and (leaking := [name for name, data in uploads.items() if _contains(data, needle)]):
        raise ValueError(
            f"Refusing to upload: {leaking} contain the Hub token. Remove it (save_training_config strips token "
            "fields) and push again; consider revoking the token if these files were shared."
        )
    logger.info("Pushing %s to %s", list(uploads), repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in uploads.items()]
    return api.create_commit(
        repo_id, operations=operations, commit_message=commit_message, token=token, revision=revision
    )


# --- Exported models (grpo_ext.export) ---

EXPORT_CARD_TEMPLATE = Path(__file__).parent / "templates" / "export_model_card.md"
# What an export folder may upload: merged weights (single file, index, shards), configs, tokenizer, GGUF + Modelfile.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "Modelfile", *TOKENIZER_FILES)
MERGE_PATHS = {
    "nf4": "into the dequantised NF4 weights the adapter saw in training (QLoRA), in float32",
    "original": "into the base model's original weights, in float32",
}


def export_upload_files(folder: str | os.PathLike) -> list[str]:
    """File names of an export folder that `push_export_to_hub` uploads (the card excepted)."""
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "export.json")):
        raise ValueError(f"{folder} is not an export folder (no export.json): run `python -m grpo_ext.export` first.")
    weights = lambda name: name.startswith("model") and name.endswith((".safetensors", ".gguf"))  # noqa: E731
    names = [name for name in os.listdir(folder) if name in EXPORT_FILES or weights(name)]
    gguf_folder = os.path.join(folder, "gguf")  # the GGUF file and its Modelfile (export.GGUF_FOLDER)
    if os.path.isdir(gguf_folder):
        names += [f"gguf/{name}" for name in os.listdir(gguf_folder) if name == "Modelfile" or weights(name)]
    return sorted(names)


def export_model_card(info: dict, repo_id: str) -> str:
    """The README.md of an exported model from templates/export_model_card.md: base, adapter, merge path,
    quantisation and the measured drift, from the export's `export.json` (`info`)."""
    base, adapter = info.get("base"), info.get("adapter")
    gguf = info.get("gguf") or {}
    tags = ["grpo", "grpo-ext", *(["merged"] if adapter else []), *(["gguf"] if gguf else [])]
    card_data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="transformers" if "merged" in info else "gguf",
        tags=tags,
        pipeline_tag="text-generation",
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(EXPORT_CARD_TEMPLATE),
        marker=CARD_MARKER,
        repo_id=repo_id,
        base=base if _is_hub_id(base) else base and os.path.basename(os.path.normpath(base)),
        adapter=adapter and os.path.basename(os.path.normpath(adapter)),  # a local path says nothing on the Hub
        merge_path=MERGE_PATHS.get(info.get("merge_into"), "none"),
        merged_dtype=(info.get("merged") or {}).get("dtype"),
        gguf_file=gguf.get("file"),
        gguf_quant=gguf.get("quant"),
        drift_reference=(info.get("drift") or {}).get("reference"),
        drift_rows=(info.get("drift") or {}).get("rows"),
    )
    return f"{card}\n"


def push_export_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model exported from a GRPO run (grpo-ext)",
    api: HfApi | None = None,
):
    """Upload an export folder (merged weights and / or a GGUF file with its Modelfile) and its card to `repo_id` in
    one commit, refused when a file holds `token`, as `push_adapter_to_hub`; returns the `CommitInfo`."""
    folder = os.fspath(folder)
    files = export_upload_files(folder)
    info = _read_json(Path(folder, "export.json")) or {}
    api = api if api is not None else HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    card = export_model_card(info, repo_id).encode("utf-8")
    uploads = {name: os.path.join(folder, name) for name in files} | {MODEL_CARD: card}
    return _commit_uploads(api, repo_id, uploads, token, commit_message)


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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-ext-upload")  # no thread yet
        self._newest: tuple[str, Callable, Future] | None = None  # in save order, the newest upload ends last

    def busy(self) -> bool:
        return self._newest is not None and not self._newest[2].done()

    def submit(self, folder: str, upload: Callable[[], object]) -> None:
        """Run `upload()` (which pushes `folder`) in the background."""
        failure = (
            "Uploading %s to the Hub failed (%s: %s). Training goes on; the upload is retried once at the end of "
            "training."
        )
        self._newest = (folder, upload, self._executor.submit(_attempt, folder, upload, failure))

    def finish(self) -> bool:
        """Wait for the uploads left, retry the newest once if it failed; True when nothing is left failed."""
        (folder, upload, future), self._newest = self._newest or (None, None, None), None
        if future is None or future.result():
            return True
        if not os.path.isdir(folder):
            logger.warning("Not retrying the upload of %s: the folder was deleted (save_total_limit).", folder)
            return False
        failure = (
            "Retrying the upload of %s failed too (%s: %s). The checkpoint is intact on disk; push the result later "
            "with trainer.push_to_hub(), or push_adapter_to_hub(folder, repo_id)."
        )
        if ok := _attempt(folder, upload, failure):
            logger.info("Retried upload of %s succeeded.", folder)
        return ok


def _attempt(folder: str, upload: Callable[[], object], failure: str) -> bool:
    """`upload()`; on an error, the `failure` warning (formatted with folder, error type and error) and False."""
    try:
        upload()
        return True
    except Exception as error:
        logger.warning(failure, folder, type(error).__name__, error)
        return False


# --- Completions tables, uploaded to a dataset repository during training ---


def completions_dataset_card(repo_id: str, model_repo_id: str | None = None) -> str:
    """The README.md of the completions dataset, from templates/completions_dataset_card.md."""
    card_data = DatasetCardData(pretty_name="GRPO completions", tags=["grpo", "grpo-ext", "trl", "completions"])
    card = DatasetCard.from_template(
        card_data, template_path=str(COMPLETIONS_CARD_TEMPLATE), repo_id=repo_id, model_repo_id=model_repo_id
    )
    return f"{card}\n"


def start_completions_uploads(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    model_repo_id: str | None = None,
    api: HfApi | None = None,
) -> CommitScheduler:
    """Create the dataset repository `repo_id` (`private` if new), upload its card, and return huggingface_hub's
    `CommitScheduler` that uploads the parquet files of `folder` new or changed since its last commit, every
    `COMPLETIONS_UPLOAD_MINUTES` minutes in a background thread (a failed upload is logged and retried at the next
    one). `api`: the `HfApi` to use (tests record its calls)."""
    api = api if api is not None else HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token).repo_id
    api.upload_file(
        path_or_fileobj=completions_dataset_card(repo_id, model_repo_id).encode("utf-8"),
        path_in_repo=MODEL_CARD,
        repo_id=repo_id,
        repo_type="dataset",
        token=token,
        commit_message="Dataset card",
    )
    return CommitScheduler(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=folder,
        every=COMPLETIONS_UPLOAD_MINUTES,
        allow_patterns=["*.parquet"],
        token=token,
        hf_api=api,
    )


def finish_completions_uploads(scheduler: CommitScheduler) -> bool:
    """Upload the parquet files written since the scheduler's last commit and wait for it (end of training); a
    failure is a warning. True when it worked."""
    try:
        scheduler.trigger().result()
        return True
    except Exception as error:
        logger.warning(
            "Uploading the completions to the Hub dataset %s failed (%s: %s). They are saved in %s.",
            scheduler.repo_id,
            type(error).__name__,
            error,
            scheduler.folder_path,
        )
        return False
