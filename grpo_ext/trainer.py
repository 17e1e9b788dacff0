"""GRPOExtTrainer: orchestrates one GRPO step (docs/architecture.md, "One training step"); holds no formula inline.

sample (TRL's RepeatSampler) -> roll out (rollout, prefix_sharing) -> score (rewards) -> advantages (advantages) ->
log-probs (rollout, logprobs, reference) -> loss (objective) -> log.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from transformers import TrainerState, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, HubStrategy, TrainOutput
from trl.models.utils import prepare_deepspeed
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from .advantages import (
    batch_normalized_advantages,
    group_normalized_rewards,
    group_relative_advantages,
    group_std,
    nanstd,
)
from .callbacks import PreTrainingLogsCallback, ReferenceSyncCallback, SaveOnInterruptCallback
from .checkpoints import (
    check_checkpoint_weights,
    check_output_dir,
    check_resume_settings,
    explain_full_disk,
    read_state,
    resolve_checkpoint,
    write_state,
)
from .completions import completions_folder, parquet_path, table_rows, write_parquet
from .config import GRPOExtConfig
from .cpu import trains_on_cpu
from .data import (
    as_dataset,
    check_dataset,
    check_dispatch_batches,
    check_eval_batch,
    check_streaming_settings,
    checked_stream,
    collate_rows,
    grouped_stream,
)
from .diagnosis import RunDiagnosis
from .evaluation import (
    generate_answers,
    greedy_config,
    metrics_of_problems,
    process_share,
    resolve_task_metrics,
    score_answers,
    task_scorer,
)
from .guards import FiniteGuard, gather_1d
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
from .logprobs import check_against_full_logits
from .models import activation_checkpointing_off, cast_lm_head_to_fp32, prepare_policy, unwrapped_for_generation
from .moe import router_aux_coef
from .objective import (
    EntropyController,
    Normalisers,
    aggregate_loss,
    grpo_per_token_loss,
    high_entropy_mask,
    mean_entropy,
    off_policy_mask,
    router_aux_loss_term,
)
from .penalties import AdaptiveKLController, missing_eos_penalty, overlong_penalty, sequence_kl
from .reference import ReferencePolicy, load_reference_copy
from .reporting import LoggingGuard
from .reward_scoring import RewardScorer
from .rollout import (
    GenerationPlan,
    Rollout,
    build_generation_config,
    continuous_batching_config,
    encode_prompts,
    eos_token_ids,
    generate_completions,
    is_conversational,
    plan_generation,
    score_rollout,
    varying_groups,
)
from .settings import check_settings
from .tools import ToolCalling, complete_turns, custom_rollout, placeholder_dataset, tool_metrics

logger = logging.getLogger(__name__)


class GRPOExtTrainer(_BaseTrainer):
    """Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300), a drop-in for `trl.GRPOTrainer`.

    Args:
        model: a model id or local path (loaded with `args.model_init_kwargs`), or a `PreTrainedModel` / `PeftModel`.
        reward_funcs: one or a list of: `f(prompts, completions, completion_ids, **columns) -> list[float | None]`
            (sync or async), a sequence-classification reward model, or the id / path of one.
        args: a `GRPOExtConfig`.
        train_dataset, eval_dataset: datasets with a `prompt` column (text, or a list of chat messages); other
            columns are passed to the reward functions as keyword arguments. Either may be a stream
            (`datasets.IterableDataset`, e.g. `load_dataset(..., streaming=True)`); a streamed train set needs
            `max_steps`. `eval_dataset` may be a dict of named datasets.
        processing_class: the policy's tokenizer; loaded from the model's path when omitted.
        reward_processing_classes: tokenizers of the reward models, in the order of `reward_funcs`.
        callbacks, optimizers: as in `transformers.Trainer`.
        quantization_config: a `BitsAndBytesConfig` used when `model` is a string (QLoRA with `peft_config`).
        peft_config: a `peft.PeftConfig` to train an adapter instead of the full model.
        tools: Python functions (sync or async) the model may call; their signatures and docstrings are the schema
            the chat template shows it. Tool results are part of the completion but not scored (`grpo_ext.tools`).
        environment_factory: a callable returning an environment (its public methods are tools, `reset(**row)`
            starts an episode, an optional `get_reward()` is a reward), or a dict name -> callable selected by each
            row's `environment` column. `reward_funcs` may be None when an environment owns the reward, and
            `train_dataset` may be None with a single environment whose `reset` returns the prompt (then set
            `max_steps`).
        rollout_func: TRL's custom rollout, `rollout_func(prompts, trainer) -> dict` with `prompt_ids`,
            `completion_ids` (unpadded lists, one row per completion: `num_generations` per prompt) and `logprobs`;
            any other key is passed to the reward functions (a list: one value per row), and `env_mask` (1 on tokens
            the model generated) keeps other tokens out of the loss. The sampling `logprobs` are not used (no vLLM
            importance-sampling correction here).
    """

    # Tags on the model, as TRL's trainers add them (transformers' own pushes carry them); the model card is grpo-ext's
    _tag_names = ["trl", "grpo", "grpo-ext"]
    # compute_loss divides by the window's normalisers itself (objective.aggregate_loss)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOExtConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GRPOExtConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-GRPO")
        elif not isinstance(args, GRPOExtConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; GRPOExtTrainer needs a GRPOExtConfig (same field names as "
                "trl.GRPOConfig: `from grpo_ext import GRPOExtConfig`)."
            )
        check_settings(args)  # the rules that need other modules' tables (loss types, ...), before anything loads
        set_seed(args.seed)  # before the model is built: PEFT initialises adapters randomly
        train_dataset = as_dataset(train_dataset, "train_dataset")  # a plain list of rows becomes a Dataset
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: as_dataset(value, f"eval_dataset[{key!r}]") for key, value in eval_dataset.items()}
        else:
            eval_dataset = as_dataset(eval_dataset, "eval_dataset")
        check_streaming_settings(args, train_dataset, eval_dataset)  # before the accelerator reads args
        if args.should_save:  # a folder that cannot be written would lose the work at the first save
            check_output_dir(args.output_dir)

        # Model, tokenizer, adapter
        model_path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        self._model_path = str(model_path or "")  # recorded in checkpoints, compared on resume
        model, processing_class, fitted = prepare_policy(
            model, args, processing_class, peft_config, quantization_config
        )
        if fitted is not None:  # gpu_memory_budget: the micro-batch the memory planner predicts to fit
            args.resize_micro_batch(fitted.per_device_train_batch_size, fitted.gradient_accumulation_steps)
        self.eos_token_ids = eos_token_ids(model, processing_class)
        # MoE load-balancing loss (TRL's names): the coefficient given, else the model config's; 0.0 for dense models
        self.router_aux_loss_coef = router_aux_coef(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = self.router_aux_loss_coef != 0.0

        # Tools and environments (grpo_ext.tools); an environment with get_reward is a reward source
        self.rollout_func = rollout_func  # TRL's custom rollout (tools.custom_rollout), or None
        if rollout_func is not None and (tools or environment_factory is not None):
            raise ValueError("rollout_func replaces generation, tools and environments: pass either, not both.")
        if train_dataset is None and environment_factory is None:
            raise ValueError(
                "train_dataset is required unless an environment_factory is provided (its reset() then writes each "
                "prompt). Pass a datasets.Dataset or IterableDataset with a `prompt` column."
            )
        self._tool_calling, placeholder = None, None
        if tools or environment_factory is not None:
            self._tool_calling = ToolCalling(
                processing_class,
                tools,
                environment_factory,
                args.max_tool_calling_iterations,
                tool_timeout=args.tool_timeout,
                reset_timeout=args.environment_reset_timeout,
            )
            if train_dataset is None:  # the environment's reset() writes each prompt
                train_dataset = placeholder = placeholder_dataset(environment_factory, args)

        # Rewards and data, checked now rather than at the first step
        self.rewards = RewardScorer(
            reward_funcs,
            extra_funcs=self._tool_calling.reward_funcs if self._tool_calling else (),
            reward_weights=args.reward_weights,
            reward_processing_classes=reward_processing_classes,
            model_init_kwargs=args.model_init_kwargs,
            chat_template_kwargs=args.chat_template_kwargs,
            nonfinite_rewards=args.nonfinite_rewards,
            timeout=args.reward_timeout,
        )
        # Task metrics of evaluations (evaluation.py), resolved now: a name that loads nothing fails before training
        self.task_metrics = None
        if args.eval_reward_funcs:
            if self._tool_calling is not None or rollout_func is not None:
                raise ValueError(
                    "eval_reward_funcs measures single-turn answers; with tools, an environment_factory or a "
                    "rollout_func it is not supported yet. Score the task in a reward function and read "
                    "eval_rewards/<name>/mean instead."
                )
            named = dict(zip(self.rewards.names, self.rewards.reward_funcs))
            self.task_metrics = task_scorer(resolve_task_metrics(args.eval_reward_funcs, named))
        max_positions = getattr(model.config, "max_position_embeddings", None)
        # a rollout_func may supply reward arguments itself (its extra fields): then no column is required up front
        required_columns = self.rewards.required_columns() if rollout_func is None else {}
        task_columns = self.task_metrics.required_columns() if self.task_metrics is not None else {}
        datasets = [("train_dataset", train_dataset)]
        for split, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
            datasets.append((f"eval_dataset[{split!r}]" if split else "eval_dataset", dataset))
        for name, dataset in datasets:
            if self._tool_calling is not None:
                self._tool_calling.check_dataset(dataset, name)
            if dataset is not placeholder:
                needed = required_columns if name == "train_dataset" else {**required_columns, **task_columns}
                check_dataset(dataset, name, args, needed, processing_class, max_positions)
        if eval_dataset is not None:
            check_eval_batch(args)
        # A stream's later rows are checked as they are read, as its first ones were now (data.checked_stream)
        self._stream_checks = {
            "train": required_columns,
            "eval": {**required_columns, **task_columns},
            "max_positions": max_positions,
        }

        zero3 = is_deepspeed_zero3_enabled()  # set by args.deepspeed: from_pretrained has partitioned the weights
        load_copy = functools.partial(
            load_reference_copy, model_path, args.model_init_kwargs, quantization_config, trains_on_cpu(args)
        )
        self.reference = ReferencePolicy.build(
            model,
            args.ref_model_mode,
            needed=args.beta > 0 or args.reward_kl_coef > 0,
            load_copy=load_copy if zero3 else None,
            partitioned=zero3,
            mixed=args.sync_ref_model,
        )
        self.entropy_control = EntropyController.from_config(args)  # entropy bonus, off by default
        self.reward_kl_controller = None
        if args.reward_kl_target is not None:
            self.reward_kl_controller = AdaptiveKLController(
                args.reward_kl_coef, args.reward_kl_target, args.reward_kl_horizon
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=collate_rows,  # prompts are tokenized at rollout time
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        # Sharded: two backbone passes in one forward are untested, and ranks must run the same number of forwards
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if sharded and (args.prefix_sharing or args.drop_finished_rows):
            logger.warning("DeepSpeed / FSDP: prefix_sharing and drop_finished_rows are off (untested when sharded).")
        self._prefix_sharing = args.prefix_sharing and not sharded
        self._drop_finished_rows = args.drop_finished_rows and not sharded
        self._batching = continuous_batching_config(args)  # transformers' engine instead of grpo-ext's loop, or None
        self._length_buckets = self.accelerator.num_processes == 1  # its forward count follows this rank's lengths
        self._uploads = CheckpointUploads()  # adapter checkpoints pushed in the background during training
        self._completions_uploads = None  # log_completions_hub_repo: the completions tables, in the background
        if args.log_completions_hub_repo is not None and self.accelerator.is_main_process:
            self._completions_uploads = self._start_completions_uploads()
        self._interrupt = SaveOnInterruptCallback()
        self.add_callback(self._interrupt)
        self._pre_training_logs = PreTrainingLogsCallback()
        self.add_callback(self._pre_training_logs)
        if self.reference.mode == "snapshot_adapter" or args.sync_ref_model:  # alpha = 1: the snapshot's reset
            alpha = args.ref_model_mixup_alpha if args.sync_ref_model else 1.0
            self.add_callback(ReferenceSyncCallback(self.reference, self.model, args.ref_model_sync_steps, alpha))
        if self.accelerator.is_main_process:
            print(f"[grpo-ext] reference policy: {self.reference.mode} ({self.reference.memory_note(self.model)})")
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded weights cannot be scored here
            check_against_full_logits(self.model)
        if self.reference.model is not None and args.cast_lm_head_to_fp32:  # a copy loaded again (ZeRO-3) too
            cast_lm_head_to_fp32(self.reference.model)
        if self.reference.model is not None:  # under DeepSpeed an inference engine, partitioned like the policy
            self.reference.model = (
                prepare_deepspeed(self.reference.model, self.accelerator)
                if self.is_deepspeed_enabled
                else self.accelerator.prepare_model(self.reference.model, evaluation_mode=True)
            )
        for reward_model in self.rewards.reward_models:
            reward_model.to(self.accelerator.device)

        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.generation_config = build_generation_config(args, processing_class.pad_token_id, self.eos_token_ids)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Tokens behind each token-mean metric value, so `log` weights them: the logged kl / entropy / clip ratios are
        # then token means over everything since the last log, whatever the micro-batch and process split.
        self._metric_tokens = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._samples = {}  # columns of the last rollout's completions table, for log_completions
        # A failing tracker or completions file is a warning, not the end of the run (reporting.py)
        self._logging = LoggingGuard()
        self._logging.guard_trackers(self.callback_handler.callbacks)
        self._task_dataset = None  # the set the evaluation under way measures the task metrics on
        self._unscored_task_metrics = set()  # warned about once
        # Run doctor: reads each log, adds doctor/* metrics, warns on the main process only (said once, not N times)
        self._doctor = (
            RunDiagnosis.from_config(args, speak=self.accelerator.is_main_process) if args.doctor_live else None
        )
        self._buffered_inputs = None
        self._plan = None  # how the current rollout generates (rollout.plan_generation), set per rollout
        self._step = 0  # micro-steps taken, to know when to roll out again
        self._finite = FiniteGuard()  # no NaN update, no NaN checkpoint
        # dynamic sampling draws extra prompts from its own generator, different on each process
        self._refill_rng = random.Random(args.seed + 1000 * self.accelerator.process_index)

    @property
    def interrupted(self) -> bool:
        """True when SIGTERM or Ctrl-C stopped the last `train()` early (after saving a checkpoint)."""
        return self._interrupt.interrupted

    @property
    def logging_failures(self) -> dict[str, int]:
        """How many times logging to each destination (the completions files, a tracker) failed; the first failure of
        each was a warning, the others are only counted (`reporting.LoggingGuard`)."""
        return dict(self._logging.failures)

    @property
    def interrupted_exit_code(self) -> int:
        """What a script should exit with after `train()`: 0, or 128 + the signal that stopped it early (143 for
        SIGTERM), so that a scheduler requeueing pre-empted jobs does not take the run for finished."""
        return self._interrupt.exit_code

    # --- TRL's public surface: reward functions and the loss masks, as trl.GRPOTrainer names them ---

    @property
    def reward_funcs(self) -> list:
        """The reward functions, a reward model as its `nn.Module` (as in TRL), in the order given."""
        return self.rewards.reward_funcs

    @property
    def reward_func_names(self) -> list[str]:
        """Their names, as in the metrics (`rewards/<name>/mean`)."""
        return self.rewards.names

    @property
    def reward_processing_classes(self) -> list:
        """Per reward function: a reward model's tokenizer, else the entry given (None by default)."""
        return self.rewards.processing_classes

    @property
    def reward_weights(self) -> torch.Tensor:
        """`(K,)` float32 weights of the reward functions; assigning new ones applies from the next rollout."""
        return self.rewards.weights

    @reward_weights.setter
    def reward_weights(self, weights) -> None:
        self.rewards.set_weights(weights)

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """`(B, C)` bool: completion tokens whose entropy is at least the `threshold` quantile (in [0, 1]) of all
        processes' completion-token entropies (`objective.high_entropy_mask`). `compute_loss` calls it with
        `threshold = 1 - top_entropy_quantile`."""
        return high_entropy_mask(entropies, mask, threshold, functools.partial(gather_1d, self.accelerator))

    @staticmethod
    def get_off_policy_mask(
        advantages: torch.Tensor,
        per_token_logps: torch.Tensor,
        sampling_per_token_logps: torch.Tensor,
        mask: torch.Tensor,
        off_policy_threshold: float,
    ) -> torch.Tensor:
        """DeepSeek-V3.2's off-policy sequence mask `(B, 1)`: 0.0 drops a completion with a negative advantage whose
        mean token KL(pi_sampling || pi_theta) exceeds `off_policy_threshold`, 1.0 keeps it
        (`objective.off_policy_mask`). `compute_loss` calls it with the old log-probs as `sampling_per_token_logps`."""
        return off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)

    # --- Data: each prompt G times in a row, one generation batch per rollout ---

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

    # --- One step ---

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._finite.check_loss(loss, self.accelerator, self.state.global_step + 1)  # before the optimizer step
        return loss

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Once per optimizer step, before any checkpoint of that step is written
        step = self.state.global_step
        self._finite.check_weights(self.model, self.accelerator, step, f"go on after step {step}")
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _prepare_inputs(self, generation_batch: list[dict]) -> Rollout:
        if not self.model.training:
            return self.generate_and_score(generation_batch, mode="eval")
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            if self.args.dynamic_sampling:
                rollout = self._roll_out_varying_groups(generation_batch)
            else:
                rollout = self.generate_and_score(generation_batch, mode="train")
            self._buffered_inputs = self._split_into_micro_batches(rollout)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    @property
    def _policy_moves_during_rollout(self) -> bool:
        """True when an optimizer step happens between a rollout and the use of its data: old log-probs needed."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0

    def _completion_logps(self, model, rollout: Rollout | dict) -> torch.Tensor:
        """Log-probs `(B, C)` without gradient (rollout, old and reference passes)."""
        if isinstance(rollout, dict):
            rollout = Rollout.from_dict(rollout, self.args.max_completion_length)
        with (
            torch.no_grad(),
            activation_checkpointing_off(self.model, self.args.activation_checkpointing_kwargs),
            self.compute_loss_context_manager(),
        ):
            scores = score_rollout(
                model, rollout, self.args.temperature, self.args.logprob_chunk_size, length_buckets=self._length_buckets
            )
        return scores.logps

    def generate_and_score(self, rows: list[dict], mode: str = "train") -> Rollout:
        """One generation batch as a step trains on it: `rows` (each prompt G times in a row) rolled out, rewarded,
        with their advantages and the old / reference log-probs the loss needs. `mode="eval"` uses
        `num_generations_eval` and the eval metrics. The seam to inspect or wrap a rollout (TRL's
        `_generate_and_score_completions`)."""
        device = self.accelerator.device
        G = self.num_generations if mode == "train" else self.num_generations_eval
        prompts = [row["prompt"] for row in rows]
        if self._tool_calling is not None:  # each row's environment drawn and reset, each row's tools
            prompts = self._tool_calling.start(rows, prompts)
        self._plan = plan_generation(
            self.model, self.generation_config, self._prefix_sharing, self._drop_finished_rows, self._batching
        )
        prompt_ids, completion_ids_list, tool_mask, completions, _, extra_fields, *_ = self._generate(prompts)
        rollout = Rollout.of_token_lists(
            prompt_ids,
            completion_ids_list,
            tool_mask,
            self.processing_class.pad_token_id,
            self.eos_token_ids,
            self.args.mask_truncated_completions,
            self._plan.shared_prefix,
            device,
        ).padded(self.args.pad_to_multiple_of, self.processing_class.pad_token_id)
        texts = self.processing_class.batch_decode(completion_ids_list, skip_special_tokens=True)

        old_needed = mode == "train" and self._policy_moves_during_rollout
        rollout_per_token_logps = None
        if old_needed or self.args.reward_kl_coef > 0:  # log-probs of the policy that sampled the rollout
            rollout_per_token_logps = self._completion_logps(self.model, rollout)  # (B, C)
        rollout.old_per_token_logps = rollout_per_token_logps if old_needed else None
        if self.reference.mode != "none":  # one reference pass serves both penalties
            with self.reference.activate(self.model) as reference_model:
                rollout.ref_per_token_logps = self._completion_logps(reference_model, rollout)  # (B, C)

        # Rewards of the whole group are needed for its advantages: gather them from every process.
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        columns["trainer_state"] = self.state
        for key, values in extra_fields.items():  # a rollout_func's extra fields: a list holds one value per row
            columns[key] = values if isinstance(values, list) else [values] * len(rows)
        if self._tool_calling is not None and self._tool_calling.instances is not None:
            columns["environments"] = self._tool_calling.instances
        local_rewards_per_func = self.rewards.score(prompts, completions, completion_ids_list, columns)  # (B, K)
        logged_metrics, extra_columns = self.rewards.gather_logs(self.accelerator, len(rows))  # log_metric, log_extra
        for name, value in logged_metrics.items():
            self._metrics[mode][name].append(value)
        if self.args.nonfinite_rewards == "drop":
            dropped = self.accelerator.reduce(torch.tensor(self.rewards.nonfinite_counts, device=device), "sum")
            for name, count in zip(self.rewards.names, dropped.tolist()):
                self._metrics[mode][f"rewards/{name}/nonfinite"].append(float(count))
        rewards_per_func = gather(local_rewards_per_func.to(device))  # (B * num_processes, K)
        rewards = self.rewards.weighted_sum(rewards_per_func)  # (B * num_processes,)
        penalty = self._reward_penalties(mode, rollout, rollout_per_token_logps)
        shaped_rewards = rewards - penalty  # (B * num_processes,)
        if self.args.multi_objective_aggregation == "normalize_then_sum":  # GDPO: each function normalised first
            aggregated = self.rewards.weighted_sum(group_normalized_rewards(rewards_per_func, G)) - penalty
            advantages, std = batch_normalized_advantages(aggregated)
        else:
            aggregated = shaped_rewards
            advantages, std = group_relative_advantages(aggregated, G, self.args.scale_rewards)
        start = self.accelerator.process_index * len(rows)  # this process's rows
        rollout.advantages = advantages[start : start + len(rows)]  # (B,)
        rollout.group_std = group_std(aggregated, G)[start : start + len(rows)]  # (B,) for dynamic sampling

        self._log_rollout(mode, rewards_per_func, rewards, std, rollout)
        if penalty.any():
            self._metrics[mode]["reward_shaped"].append(torch.nanmean(shaped_rewards).item())
        if self.args.log_completions and mode == "train":
            self._samples = {
                "step": [self.state.global_step] * rewards.numel(),
                "prompt": [str(p) for p in gather_object(prompts)],
                "completion": gather_object(texts),
                **{name: rewards_per_func[:, k].tolist() for k, name in enumerate(self.rewards.names)},
                **extra_columns,
                "reward": rewards.tolist(),
                "advantage": advantages.tolist(),
            }
        return rollout

    def _generate(self, prompts: list):
        """`trl.GRPOTrainer._generate`: G completions per prompt (the prompts repeated G times in a row), with the
        tool-calling rounds when the trainer has tools. Returns, per row, unpadded lists: `(prompt_ids,
        completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images)`, `tool_mask` None
        without tools, `logprobs` None (no vLLM), no images. A subclass may override it; the rollout goes through it.
        With a `rollout_func`, its rollout (`tools.custom_rollout`).
        """
        if self.rollout_func is not None:
            return custom_rollout(self.rollout_func, prompts, self, self.processing_class)
        plan = self._plan or plan_generation(
            self.model, self.generation_config, self._prefix_sharing, self._drop_finished_rows, self._batching
        )
        tool_calling = self._tool_calling
        device, config = self.accelerator.device, self.generation_config
        prompt_ids, prompt_mask = encode_prompts(
            self.processing_class,
            prompts,
            self.args.chat_template_kwargs,
            self.args.max_prompt_length,
            device,
            tools=tool_calling.row_tools if tool_calling is not None else None,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
        )  # (B, P)
        with unwrapped_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            checkpointing_kwargs=self.args.activation_checkpointing_kwargs,
        ) as unwrapped_model:
            num_generations = self.num_generations if self.model.training else self.num_generations_eval
            completion_ids = generate_completions(
                unwrapped_model, prompt_ids, prompt_mask, num_generations, config, plan
            )  # (B, C)

            def go_on(history_ids, history_mask, max_new_tokens):  # later turns: one completion per history
                later = copy.deepcopy(config)
                later.max_new_tokens = max_new_tokens
                one_each = GenerationPlan(
                    drop_finished_rows=plan.drop_finished_rows, continuous_batching=plan.continuous_batching
                )
                return generate_completions(
                    unwrapped_model, history_ids.to(device), history_mask.to(device), 1, later, one_each
                )

            prompt_ids, completion_ids, tool_mask, completions, turns = complete_turns(
                self.processing_class, prompt_ids, prompt_mask, completion_ids, is_conversational(prompts[0]),
                self.eos_token_ids, tool_calling, go_on, self.args.max_completion_length,
                getattr(unwrapped_model.config, "max_position_embeddings", None), self.args.chat_template_kwargs,
            )  # fmt: skip
        if tool_calling is not None:
            mode = "train" if self.model.training else "eval"
            for name, value in tool_metrics(turns, len(prompts), self.accelerator).items():
                self._metrics[mode][name].append(value)
        return prompt_ids, completion_ids, tool_mask, completions, None, {}, None, []

    def _roll_out_varying_groups(self, rows: list[dict]) -> Rollout:
        """DAPO's dynamic sampling: keep groups whose rewards vary, roll out fresh prompts until the batch is full
        of them or `max_sampling_rounds` is reached, then top up with dropped groups (their advantages are 0)."""
        G, needed = self.num_generations, len(rows) // self.num_generations
        kept, dropped, rounds = [], [], 0
        while True:
            rounds += 1
            rollout = self.generate_and_score(rows, mode="train")
            varying = varying_groups(rollout.group_std, G).tolist()  # (groups,)
            for group, keep in enumerate(varying):
                (kept if keep else dropped).append(rollout.rows(group * G, (group + 1) * G))
            missing = torch.tensor([max(needed - len(kept), 0)], device=self.accelerator.device)
            # Every process rolls out the same number of groups each round (rewards are gathered), until all are full
            most_missing = int(gather(missing).max())
            if most_missing == 0 or rounds >= self.args.max_sampling_rounds:
                break
            indices = self._refill_rng.sample(range(len(self.train_dataset)), most_missing)
            rows = [self.train_dataset[i] for i in indices for _ in range(G)]
        groups = kept[:needed] + dropped[: needed - min(len(kept), needed)]
        kept_ratio = self.accelerator.reduce(
            torch.tensor(min(len(kept), needed) / needed, device=self.accelerator.device), "mean"
        )
        self._metrics["train"]["sampling/rounds"].append(float(rounds))
        self._metrics["train"]["sampling/kept_groups_ratio"].append(kept_ratio.item())
        return Rollout.concat(groups)

    def _reward_penalties(self, mode, rollout: Rollout, rollout_per_token_logps) -> torch.Tensor:
        """beta_r * sum_t KL_t + overlong + missing-EOS, per completion of all processes `(B * num_processes,)`."""
        args, metrics = self.args, self._metrics[mode]
        lengths, is_truncated = rollout.lengths, rollout.is_truncated  # (B,) each
        penalty = torch.zeros(lengths.size(0), device=lengths.device)  # (B,)
        if args.reward_kl_coef > 0:
            coef = self.reward_kl_controller.value if self.reward_kl_controller else args.reward_kl_coef
            kl = sequence_kl(  # (B,)
                rollout_per_token_logps, rollout.ref_per_token_logps, rollout.loss_mask, args.reward_kl_estimator
            )
            penalty = penalty + coef * kl
            mean_kl = gather(kl).mean().item()
            metrics["penalty/reward_kl"].append(mean_kl)
            metrics["penalty/reward_kl_coef"].append(coef)
            if self.reward_kl_controller and mode == "train":  # this rollout used coef; the next one uses the update
                self.reward_kl_controller.update(mean_kl, lengths.size(0) * self.accelerator.num_processes)
        if args.overlong_buffer_len is not None:
            overlong = overlong_penalty(
                lengths, args.max_completion_length, args.overlong_buffer_len, args.overlong_penalty_factor
            )  # (B,)
            penalty = penalty + overlong
            metrics["penalty/overlong"].append(gather(overlong).mean().item())
        if args.missing_eos_penalty is not None:
            missing_eos = missing_eos_penalty(is_truncated, args.missing_eos_penalty)  # (B,)
            penalty = penalty + missing_eos
            metrics["penalty/missing_eos"].append(gather(missing_eos).mean().item())
        return gather(penalty)

    def _split_into_micro_batches(self, rollout: Rollout) -> list[Rollout]:
        """Slice a rollout into steps_per_generation micro-batches and attach the normalisers of their window.

        The window is the gradient_accumulation_steps micro-batches summed into one optimizer step. When the rollout
        covers whole windows (steps_per_generation a multiple of gradient_accumulation_steps, the default), counts are
        exact; otherwise they are the rollout's counts scaled to one window, as TRL does.
        """
        steps, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        micro_batches = rollout.split(steps)
        tokens = torch.stack([mb.loss_mask.sum() for mb in micro_batches]).float()  # (steps,)
        if steps % accumulation == 0:
            window_tokens = tokens.view(-1, accumulation).sum(1).repeat_interleave(accumulation)  # (steps,)
        else:
            window_tokens = tokens.sum().expand(steps) * accumulation / steps
        global_window_tokens = self.accelerator.reduce(window_tokens.clone(), reduction="sum")  # (steps,)
        for i, micro_batch in enumerate(micro_batches):
            micro_batch.normalisers = Normalisers(
                num_sequences=float(len(micro_batch) * accumulation),
                num_tokens=float(window_tokens[i]),
                num_global_tokens=float(global_window_tokens[i]) / self.accelerator.num_processes,
                max_completion_length=self.args.max_completion_length,
            )
        return micro_batches

    def compute_loss(self, model, inputs: Rollout | dict, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GRPOExtTrainer.compute_loss does not return outputs.")
        if isinstance(inputs, dict):  # a batch built as for trl.GRPOTrainer
            inputs = Rollout.from_dict(inputs, self.args.max_completion_length)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs.loss_mask  # (B, C) the generated tokens (tool results are context, not scored)
        scores = score_rollout(
            model, inputs, self.args.temperature, self.args.logprob_chunk_size, self.entropy_control.enabled,
            self._length_buckets, router_aux_loss=self.aux_loss_enabled,
        )  # fmt: skip
        per_token_logps, entropies = scores.logps, scores.entropies  # (B, C) each
        old_per_token_logps = inputs.old_per_token_logps
        if old_per_token_logps is None:  # the policy has not moved since the rollout: pi_old == pi_theta
            old_per_token_logps = per_token_logps.detach()
        # Masks of the policy term, through TRL's methods (a subclass may change them): Beyond the 80/20 rule's tokens
        # of top_entropy_quantile, DeepSeek-V3.2's off-policy sequences
        entropy_mask = policy_mask = None
        if self.args.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, completion_mask, 1.0 - self.args.top_entropy_quantile)
            policy_mask = entropy_mask  # (B, C)
        if self.args.off_policy_mask_threshold is not None:
            advantages = inputs.advantages.unsqueeze(-1) if inputs.advantages.dim() == 1 else inputs.advantages
            keep = self.get_off_policy_mask(  # (B, 1)
                advantages, per_token_logps, old_per_token_logps, completion_mask, self.args.off_policy_mask_threshold
            )
            policy_mask = keep if policy_mask is None else policy_mask * keep
        terms = grpo_per_token_loss(
            per_token_logps,
            old_per_token_logps,
            inputs.advantages,
            completion_mask,
            ref_per_token_logps=inputs.ref_per_token_logps,
            beta=self.args.beta,
            importance_sampling_level=self.args.importance_sampling_level,
            kl_estimator=self.args.kl_estimator,
            loss_type=self.args.loss_type,
            params=self.args.surrogate_params(),
            bias_correction_kl=self.args.use_bias_correction_kl,
            token_mask=policy_mask,
        )
        if mode == "train":
            # A window cut short at the end of an epoch holds current_gradient_accumulation_steps micro-batches
            accumulation = self.args.gradient_accumulation_steps
            window = getattr(self, "current_gradient_accumulation_steps", accumulation) / accumulation
            n = inputs.normalisers
            num_sequences, num_tokens = n.num_sequences * window, n.num_tokens * window
            num_global_tokens = n.num_global_tokens * window
        else:  # evaluation: each batch on its own
            num_sequences, num_tokens = completion_mask.size(0), float(completion_mask.sum())
            num_global_tokens = num_tokens
        loss = aggregate_loss(  # the loss type picks its normaliser (objective.LOSS_TYPES)
            terms.per_token_loss,
            completion_mask,
            self.args.loss_type,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_completion_length=self.args.max_completion_length,
            num_global_tokens=num_global_tokens,
        )
        if self.entropy_control.enabled:
            bonus_mask = completion_mask if entropy_mask is None else completion_mask * entropy_mask
            loss = self._add_entropy_bonus(mode, loss, entropies, bonus_mask)
        if self.aux_loss_enabled:  # the MoE load-balancing loss of this micro-batch, as TRL adds and logs it
            micro_batches = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
            loss = loss + router_aux_loss_term(scores.aux_loss, self.router_aux_loss_coef, micro_batches)
            self._metrics[mode]["aux_loss"].append(gather(scores.aux_loss.detach().reshape(1)).mean().item())
        self._log_objective(mode, terms, entropies.detach(), completion_mask)
        return loss

    def _add_entropy_bonus(self, mode, loss, entropies, mask):
        """loss - coef x mean entropy over `mask` (one micro-batch's share of the window), and the adaptive
        coefficient's update at the end of each optimizer step, from the window's entropy on all processes."""
        micro_batches = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        self._metrics[mode]["policy_loss"].append(gather(loss.detach().reshape(1) * micro_batches).nanmean().item())
        loss = loss - self.entropy_control.applied_coef() * mean_entropy(entropies, mask) / micro_batches
        if mode == "train" and self.entropy_control.adaptive:
            self.entropy_control.observe(entropies, mask)
        if mode == "train" and self.accelerator.sync_gradients:  # the window's last micro-batch
            if self.entropy_control.adaptive:
                self.entropy_control.end_window(lambda window: self.accelerator.reduce(window, reduction="sum"))
            self._metrics[mode]["entropy_coef"].append(self.entropy_control.coef)
        return loss

    # --- Evaluation: TRL's (rewards and loss of sampled completions) and the task metrics (evaluation.py) ---

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, plus the task metrics of `eval_reward_funcs` (`eval_pass@1/<name>`, ...) in the same
        log line and the returned metrics, where `metric_for_best_model`, `load_best_model_at_end` and
        `EarlyStoppingCallback` read them; `eval_task_metrics_only` skips TRL's evaluation rollout."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # transformers' own call for one named set of an eval dict
            dataset = self.eval_dataset[dataset]
        if self.task_metrics is None or isinstance(dataset, dict):  # a dict: called again for each of its sets
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._task_dataset = dataset  # for evaluation_loop, which transformers times, logs and reports
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._task_dataset = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        if self._task_dataset is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        task = {f"{prefix}_{key}": value for key, value in self._evaluate_task(self._task_dataset).items()}
        if self.args.eval_task_metrics_only:
            num_problems = int(task[f"{prefix}_task_problems"])
            return EvalLoopOutput(predictions=None, label_ids=None, metrics=task, num_samples=num_problems)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        output.metrics.update(task)  # before transformers logs them and hands them to the callbacks
        return output

    def _evaluate_task(self, dataset) -> dict[str, float]:
        """Task metrics of the policy on `dataset` (evaluation.py): its problems shared out over processes, answered
        greedily and with `eval_num_samples` samples, scored, gathered; `task_runtime` is what it took (seconds)."""
        start_time = time.perf_counter()
        args, k = self.args, self.args.eval_num_samples
        indices, rows = process_share(dataset, self.accelerator.process_index, self.accelerator.num_processes)
        prompts = [row["prompt"] for row in rows]
        settings = dict(
            stop_token_ids=self.eos_token_ids,
            chat_template_kwargs=args.chat_template_kwargs,
            max_prompt_length=args.max_prompt_length,
            batch_size=args.per_device_eval_batch_size,
        )
        self.model.eval()
        with unwrapped_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            checkpointing_kwargs=args.activation_checkpointing_kwargs,
        ) as model:

            def generate(num_samples, config):  # (completion_ids, completions), num_samples per prompt in a row
                plan = plan_generation(
                    self.model, config, self._prefix_sharing, self._drop_finished_rows, self._batching
                )
                return generate_answers(model, self.processing_class, prompts, num_samples, config, plan, **settings)

            answers = generate(1, greedy_config(self.generation_config))
            samples = generate(k, self.generation_config) if k > 1 else None
        problems = score_answers(self.task_metrics, rows, answers, samples, shared={"trainer_state": self.state})
        problems = gather_object(problems[: len(indices)])  # every process's real problems
        self._warn_unscored_task_metrics(torch.stack([problem[0] for problem in problems]), list(rows[0]))
        metrics = metrics_of_problems(self.task_metrics.names, problems)
        return {**metrics, "task_problems": float(len(problems)), "task_runtime": time.perf_counter() - start_time}

    def _warn_unscored_task_metrics(self, scores: torch.Tensor, columns: list[str]) -> None:
        """Once per metric: a task metric that returned None (NaN) for every problem `(N, K)` (a missing column it
        reads, most often) would report 0 at each evaluation without a word."""
        for name, scored in zip(self.task_metrics.names, (~scores.isnan()).any(0).tolist()):
            if not scored and name not in self._unscored_task_metrics:
                self._unscored_task_metrics.add(name)
                logger.warning(
                    f"Task metric {name!r} (eval_reward_funcs) scored none of the {scores.size(0)} eval problems: it "
                    f"returned None for each, so it is reported as 0. Does the eval set have the column it reads? "
                    f"Its columns: {columns}."
                )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- Metrics, with TRL's names ---

    def _log_token_mean(self, mode: str, names: list[str], values: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the token mean over all processes, and the token count it is over (`log` weights by it)."""
        totals = torch.stack([(values * mask).sum(), mask.sum()]).float()
        total, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        for name in names:
            self._metrics[mode][name].append(total / max(count, 1.0))
            self._metric_tokens[mode][name].append(count)

    def _log_objective(self, mode, terms, entropies, completion_mask):
        metrics = self._metrics[mode]
        mask = completion_mask.float()
        if terms.per_token_kl is not None:
            self._log_token_mean(mode, ["kl", "penalty/objective_kl"], terms.per_token_kl.detach(), mask)
        self._log_token_mean(mode, ["entropy"], entropies, mask)
        for name, values in terms.metrics.items():  # the loss type's own (cispo_clip_ratio, vespo/phi_seq_mean)
            values = values.detach().float()
            self._log_token_mean(mode, [name], values, mask if values.size(-1) > 1 else torch.ones_like(values))
        if terms.is_low_clipped is None:  # a loss type without PPO's clip: no clip_ratio/*
            return
        if terms.ratio.size(-1) == 1:  # sequence-level ratio: every token of a sequence shares its clipping
            mask = torch.ones_like(terms.ratio)
        low, high = terms.is_low_clipped.float(), terms.is_high_clipped.float()
        self._log_token_mean(mode, ["clip_ratio/low_mean"], low, mask)
        self._log_token_mean(mode, ["clip_ratio/high_mean"], high, mask)
        self._log_token_mean(mode, ["clip_ratio/region_mean"], torch.maximum(low, high), mask)
        per_sequence = lambda x: (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # noqa: E731
        metrics["clip_ratio/low_min"].append(gather(per_sequence(low)).min().item())
        metrics["clip_ratio/high_max"].append(gather(per_sequence(high)).max().item())

    def _log_rollout(self, mode, rewards_per_func, rewards, std, rollout: Rollout):
        metrics = self._metrics[mode]
        prompt_mask, lengths, is_truncated = rollout.prompt_mask, rollout.generated_lengths, rollout.is_truncated
        for k, name in enumerate(self.rewards.names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, k]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, k]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        is_std_zero = torch.isclose(std, torch.zeros_like(std))
        metrics["frac_reward_zero_std"].append(is_std_zero.float().mean().item())

        if mode == "train":
            self.state.num_input_tokens_seen += int(gather(prompt_mask.sum() + lengths.sum()).sum())
            metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        lengths, truncated = gather(lengths).float(), gather(is_truncated)  # (B * num_processes,) each
        terminated = lengths[~truncated] if not truncated.all() else torch.zeros(1)  # ended with a stop token
        for kind, values in (("", lengths), ("terminated_", terminated)):
            for stat in ("mean", "min", "max"):  # completions/mean_length, ..., completions/max_terminated_length
                metrics[f"completions/{stat}_{kind}length"].append(getattr(values, stat)().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            tokens = self._metric_tokens[mode].get(key)
            if tokens and sum(tokens) > 0:  # a token mean: weight each micro-batch by its tokens
                metrics[key] = sum(v * n for v, n in zip(values, tokens)) / sum(tokens)
            elif values:
                metrics[key] = sum(values) / len(values)
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs = {**logs, **metrics}
        if self._doctor is not None:  # before super().log, so every tracker gets the doctor/* metrics too
            logs.update(self._doctor.observe(logs, self.state.global_step, mode))
        super().log(logs, start_time)
        self._metrics[mode].clear()
        self._metric_tokens[mode].clear()
        if self.args.log_completions and mode == "train" and self._samples and self.accelerator.is_main_process:
            try:
                self._log_completions_table()
            finally:
                self._samples = {}  # logged once, not again with the end-of-training summary

    def _log_completions_table(self) -> None:
        """Print a few of the last rollout's completions, write the whole table as this step's parquet file
        (uploaded with `log_completions_hub_repo`), and send it to wandb / trackio if they run. A write or a tracker
        that fails is a warning (`reporting.LoggingGuard`): logging never ends a run."""
        samples, shown, step = self._samples, self.args.num_completions_to_print, self.state.global_step
        files = f"the completions files ({os.path.dirname(parquet_path(self.args.output_dir, step))})"
        self._logging.run(files, lambda: write_parquet(samples, self.args.output_dir, step))
        rows = table_rows(samples, unique_prompts=self.args.log_unique_prompts)
        fixed = {"step", "prompt", "completion", "reward", "advantage", *self.rewards.names}
        extra = [column for column in samples if column not in fixed]  # columns logged with log_extra
        lines = [f"step {step} completions:"]
        lines += [
            f"  reward {samples['reward'][i]:+.3f} advantage {samples['advantage'][i]:+.2f} | "
            f"{samples['prompt'][i]!r} -> {samples['completion'][i]!r}"
            + "".join(f" | {column}={samples[column][i]!r}" for column in extra)
            for i in range(len(rows))[:shown]
        ]
        print("\n".join(lines))
        if "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                table = lambda: wandb.log({"completions": wandb.Table(columns=list(samples), data=rows)}, step=step)  # noqa: E731
                self._logging.run("wandb (the completions table)", table)
        if "trackio" in self.args.report_to:
            import trackio

            table = lambda: trackio.log({"completions": trackio.Table(columns=list(samples), data=rows)}, step=step)  # noqa: E731
            self._logging.run("trackio (the completions table)", table)

    # --- Training, checkpoints and resume ---

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, plus: `resume_from_checkpoint=True` (or the string "true" a command line gives) resumes
        from the newest *complete* checkpoint of `output_dir`, skipping with a warning folders a killed process left
        half-written; a checkpoint made with another `num_generations` or `loss_type` is refused, one made from
        another model path warned about; and the SIGTERM / Ctrl-C handlers installed for training are put back when
        `train()` returns or raises. With `doctor_steps`, a fresh run (not a resumed one) first logs the pre-flight
        check of the untrained model (`grpo_ext.doctor`), which never stops training.
        """
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_checkpoint_weights(checkpoint, hasattr(self.accelerator.unwrap_model(self.model), "peft_config"))
            check_resume_settings(read_state(checkpoint).get("run", {}), self._run_settings(), checkpoint)
        elif self.args.doctor_steps > 0:
            self._log_preflight_check()
        if checkpoint is not None and self._finished(checkpoint):
            return self._finished_output(checkpoint)
        self._pre_training_logs.entries = [entry for entry in self.state.log_history if entry.get("step") == 0]
        try:
            return super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            self._interrupt.restore_handlers()
            if self._completions_uploads is not None:  # the tables written since the last scheduled upload
                finish_completions_uploads(self._completions_uploads)

    def _log_preflight_check(self) -> None:
        """`doctor_steps`: the pre-flight check's report and verdict, logged (a warning when something needs a look).
        A failing check is a warning too: it must never stop the run it checks."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # weights are sharded only once train() prepares them
            logger.warning(
                "doctor_steps: the pre-flight check does not run under DeepSpeed / FSDP; run "
                "`python -m grpo_ext.doctor --config X.yaml` on one process instead."
            )
            return
        # Imported here: `python -m grpo_ext.doctor` runs that module as __main__, after the package imports this one
        from .doctor import preflight

        try:
            report = preflight(self, self.args.doctor_steps)
        except Exception as error:
            logger.warning(
                f"doctor_steps: the pre-flight check failed ({type(error).__name__}: {error}); training goes on."
            )
            return
        if self.accelerator.is_main_process:
            logger.log(logging.WARNING if report.needs_attention else logging.INFO, "%s", report.text())

    def _finished(self, checkpoint: str) -> bool:
        """Whether `checkpoint` is already at `max_steps`: transformers would train one step more before noticing."""
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        return self.args.max_steps > 0 and state.global_step >= self.args.max_steps

    def _finished_output(self, checkpoint: str) -> TrainOutput:
        """A finished run resumed (a requeued job, say): its weights and state are loaded, nothing is trained."""
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self._load_from_checkpoint(checkpoint)
        logger.warning(
            f"{checkpoint} is at step {self.state.global_step} and max_steps={self.args.max_steps}: the run is "
            "finished, so nothing is trained (its weights are loaded). Raise max_steps to train further."
        )
        losses = [entry["train_loss"] for entry in self.state.log_history if "train_loss" in entry]
        return TrainOutput(self.state.global_step, losses[-1] if losses else 0.0, {})

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

    def _run_settings(self) -> dict:
        """Settings a checkpoint is tied to (checkpoints.RESUME_MUST_MATCH / RESUME_SHOULD_MATCH)."""
        return {
            "num_generations": self.args.num_generations,
            "loss_type": self.args.loss_type,
            "model": self._model_path,
        }

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

    def _save_checkpoint(self, model, trial):
        """grpo-ext's state first, then transformers' checkpoint, whose trainer_state.json, written last, marks the
        folder complete (checkpoints.incomplete_reason)."""
        step = self.state.global_step
        self._finite.check_weights(self.model, self.accelerator, step, f"save checkpoint-{step}")
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with explain_full_disk(folder):
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                state = {"run": self._run_settings()}
                if self.reward_kl_controller is not None:
                    state["reward_kl_controller"] = self.reward_kl_controller.state_dict()
                if self.entropy_control.adaptive:
                    state["entropy_control"] = self.entropy_control.state_dict()
                write_state(folder, state)
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on resume by every backend (DDP, DeepSpeed, FSDP), after the TrainerState is restored.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        # Continue the rollout schedule where it stopped (the next micro-step rolls out anew: no buffer is saved).
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        state = read_state(checkpoint)
        if self.reward_kl_controller is not None and "reward_kl_controller" in state:
            self.reward_kl_controller.load_state_dict(state["reward_kl_controller"])
        if self.entropy_control.adaptive and "entropy_control" in state:
            self.entropy_control.load_state_dict(state["entropy_control"])

    # --- Hub: adapters only, with grpo-ext's model card (hub.py); full models go through transformers ---

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
