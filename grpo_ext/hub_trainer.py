"""The trainer's Hub side: transformers' push methods overridden so an adapter goes up alone, with grpo-ext's model
card, in the background during training, and so an unreachable Hub never stops a run (hub.py has the upload code).

Mixed into `GRPOExtTrainer`; full models go through transformers' own push.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from transformers.trainer_utils import HubStrategy

from .checkpoints import explain_full_disk
from .completions import completions_folder
from .hub import (
    CheckpointUploads,
    HubPushError,
    finish_completions_uploads,
    model_card_for_output_dir,
    push_adapter_to_hub,
    save_card_assets,
    start_completions_uploads,
    training_config_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["HubMixin"]


class HubMixin:
    """Adapters only, with grpo-ext's model card; checkpoint uploads in the background (`hub.CheckpointUploads`, set
    as `_uploads` by the trainer); a failed final push raises `HubPushError` and leaves the result saved."""

    def save_model(self, output_dir=None, _internal_call=False):
        """`Trainer.save_model`; a full disk is named (`NoSpaceLeftError`), and with `push_to_hub` a failed upload
        is a warning here (the model is saved): `push_to_hub()` itself raises."""
        with explain_full_disk(output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call=True)
        if self.args.push_to_hub and not _internal_call:
            try:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            except HubPushError as error:
                logger.warning("%s", error)

    def _start_hub_uploads(self) -> None:
        """Adapter checkpoints pushed in the background during training; with `log_completions_hub_repo`, the
        completions tables too (main process)."""
        self._uploads = CheckpointUploads()
        self._completions_uploads = None
        if self.args.log_completions_hub_repo is not None and self.accelerator.is_main_process:
            self._completions_uploads = self._start_completions_uploads()

    def _finish_completions_uploads(self) -> None:
        """End of `train()`: the tables written since the last scheduled upload go up."""
        if self._completions_uploads is not None:
            finish_completions_uploads(self._completions_uploads)

    def _start_completions_uploads(self):
        """The dataset repository and background uploads of `log_completions_hub_repo` (hub.py); an unreachable Hub
        is a warning, not a stop: the tables stay in `output_dir/completions`."""
        folder, repo_id = completions_folder(self.args.output_dir), self.args.log_completions_hub_repo
        try:
            return start_completions_uploads(
                folder,
                repo_id,
                token=self.args.hub_token,
                private=self.args.hub_private_repo,
                model_repo_id=self.args.hub_model_id,
            )
        except Exception as error:
            logger.warning(
                f"Could not create or reach the Hub dataset repository {repo_id} ({type(error).__name__}: {error}). "
                f"Training goes on without uploading completions; they are saved in {folder}."
            )
            return None

    def _hub_repo_id(self, model_name=None) -> str:
        return self.hub_model_id or self.args.hub_model_id or model_name or Path(self.args.output_dir).absolute().name

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, folder=None, **kwargs):
        """grpo-ext's card (hub.py) as `folder`/README.md (default: `output_dir`), from what the trainer knows live."""
        if self.is_world_process_zero():
            folder = folder or self.args.output_dir
            card = model_card_for_output_dir(
                folder,
                self._hub_repo_id(model_name),
                base_model=getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", None) or None,
                datasets=dataset_name,
                reward_funcs=self.rewards.names,
                training_config=training_config_dict(self.args),
                log_history=self.state.log_history,
            )
            Path(folder).mkdir(parents=True, exist_ok=True)
            Path(folder, "README.md").write_text(card, encoding="utf-8")

    def init_hf_repo(self, token=None, private=None):
        # Called at start-up with push_to_hub: an unreachable Hub must not stop a run that can push later
        try:
            super().init_hf_repo(token, private)
        except Exception as error:
            self.hub_model_id, self.push_in_progress = self._hub_repo_id(), None
            logger.warning(
                f"Could not create or reach the Hub repository {self.hub_model_id} ({type(error).__name__}: {error}). "
                "Training goes on: checkpoint uploads are tried in the background, and the final push_to_hub() says "
                "whether it worked."
            )

    def _adapter_upload(self, folder, commit_message, token=None, private=None, revision=None, **card_args):
        """Config, curves and card written into `folder` now; its upload (`hub.push_adapter_to_hub`) to run later."""
        save_card_assets(self.args, folder)
        self.create_model_card(card_args.get("model_name"), card_args.get("dataset_name"), folder=folder)
        return functools.partial(
            push_adapter_to_hub,
            folder,
            self._hub_repo_id(card_args.get("model_name")),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision,
        )

    def push_to_hub(
        self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs
    ):
        """Upload the result (adapter: `hub.push_adapter_to_hub`'s allow-list; full model: transformers' push). A
        failed upload raises `HubPushError`: the result, saved first, is intact in `output_dir`; it says how to retry."""
        folder, repo_id = str(self.args.output_dir), self._hub_repo_id(kwargs.get("model_name"))
        try:
            if not hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
                return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
            self.save_model(_internal_call=True)
            if self.is_world_process_zero():
                self._uploads.finish()  # a checkpoint upload still running would race this one
                self.save_state()
                return self._adapter_upload(self.args.output_dir, commit_message, token, private, revision, **kwargs)()
        except Exception as error:
            raise HubPushError(
                f"Pushing {folder} to the Hub repository {repo_id} failed ({type(error).__name__}: {error}). The "
                f"trained model is saved and intact in {folder}; push it again with trainer.push_to_hub() once the "
                f"Hub is reachable (an adapter also with grpo_ext.hub.push_adapter_to_hub({folder!r}, {repo_id!r}))."
            ) from error

    def _push_from_checkpoint(self, checkpoint_folder):
        # transformers would upload training_args.bin and every file of the output folder: push the adapter only,
        # in the background (CheckpointUploads), so a slow or failing upload neither blocks nor stops training.
        if not hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            return super()._push_from_checkpoint(checkpoint_folder)
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if self._uploads.busy() and not self.args.hub_always_push:  # as transformers: skip while one runs
            return
        message = f"Training in progress, step {self.state.global_step}"
        self._uploads.submit(checkpoint_folder, self._adapter_upload(checkpoint_folder, message))

    def _finish_current_push(self):
        # End of training (and transformers' push_to_hub): wait for checkpoint uploads, retry a failed one once
        super()._finish_current_push()
        if hasattr(self, "_uploads"):
            self._uploads.finish()
