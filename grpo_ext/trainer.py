"""GRPOExtTrainer: one GRPO step (docs/architecture.md, "One training step"); holds no formula inline.

sample (TRL's RepeatSampler) -> roll out (engine) -> rewards (reward_scoring, penalties) -> advantages (advantages) ->
old / reference log-probs (rollout, reference) -> micro-batches -> loss (objective) -> log (recorder).

What overrides transformers' Trainer around the step lives beside its module, mixed in here: data loading
(`data.GroupedDataMixin`), task evaluation (`evaluation.TaskEvaluationMixin`), checkpoint state and resume
(`checkpoints.ResumeMixin`), Hub pushes (`hub_trainer.HubMixin`).
"""

from __future__ import annotations

import functools
import logging
import random

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from transformers import set_seed
from trl.trainer.base_trainer import _BaseTrainer

from .advantages import (
    batch_normalized_advantages,
    group_normalized_rewards,
    group_relative_advantages,
    group_std,
)
from .callbacks import PreTrainingLogsCallback, ReferenceSyncCallback, SaveOnInterruptCallback
from .checkpoints import (
    ResumeMixin,
    check_checkpoint_weights,
    check_output_dir,
    check_resume_settings,
    read_state,
    resolve_checkpoint,
)
from .completions import log_completions_table
from .config import GRPOExtConfig
from .data import (
    GroupedDataMixin,
    as_datasets,
    check_datasets,
    check_streaming_settings,
    collate_rows,
)
from .diagnosis import RunDiagnosis
from .engine import Generation, RolloutEngine, custom_rollout
from .evaluation import TaskEvaluationMixin, task_metrics_of
from .guards import FiniteGuard, gather_1d
from .hub_trainer import HubMixin
from .logprobs import check_against_full_logits
from .models import activation_checkpointing_off, prepare_policy, unwrapped_for_generation
from .moe import router_aux_coef
from .objective import (
    EntropyController,
    aggregate_loss,
    grpo_per_token_loss,
    high_entropy_mask,
    mean_entropy,
    off_policy_mask,
    router_aux_loss_term,
)
from .penalties import AdaptiveKLController, reward_penalties
from .recorder import MetricsRecorder
from .reference import ReferencePolicy
from .reporting import LoggingGuard
from .reward_scoring import RewardScorer
from .rollout import Rollout, eos_token_ids, micro_batches, score_rollout, varying_groups
from .settings import check_settings
from .tools import ToolCalling, placeholder_dataset, tool_metrics
from .vision import check_vision_setup, has_images, is_processor, tokenizer_of, with_images

logger = logging.getLogger(__name__)


class GRPOExtTrainer(GroupedDataMixin, TaskEvaluationMixin, ResumeMixin, HubMixin, _BaseTrainer):
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
        processing_class: the policy's tokenizer, or a vision-language model's processor (`AutoProcessor`); loaded
            from the model's path when omitted. With a processor, rows may carry images as in TRL: an `image` or
            `images` column beside conversational prompts (grpo_ext.vision).
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
        if args.use_transformers_continuous_batching and is_processor(processing_class):
            raise ValueError(  # TRL's message first
                "`use_transformers_continuous_batching` does not support multimodal models. Use `use_vllm` instead. "
                "(grpo-ext has no vLLM: set use_transformers_continuous_batching=False.)"
            )
        set_seed(args.seed)  # before the model is built: PEFT initialises adapters randomly
        train_dataset, eval_dataset = as_datasets(train_dataset, eval_dataset)  # a list of rows becomes a Dataset
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
            logger.info(fitted.summary)
            args.resize_micro_batch(fitted.per_device_train_batch_size, fitted.gradient_accumulation_steps)
        tokenizer = self._tokenizer = tokenizer_of(processing_class)  # TRL's attribute: a processor's tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        # MoE load-balancing loss (TRL's names): the coefficient given, else the model config's; 0.0 for dense models
        self.router_aux_loss_coef = router_aux_coef(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = self.router_aux_loss_coef != 0.0

        # Tools and environments (grpo_ext.tools); an environment with get_reward is a reward source
        self.rollout_func = rollout_func  # TRL's custom rollout (engine.custom_rollout), or None
        if rollout_func is not None and (tools or environment_factory is not None):
            raise ValueError("rollout_func replaces generation, tools and environments: pass either, not both.")
        check_vision_setup(model, processing_class, train_dataset, eval_dataset, rollout_func)
        self._tool_calling = None
        if tools or environment_factory is not None:
            self._tool_calling = ToolCalling.from_config(args, tokenizer, tools, environment_factory)

        # Rewards and data, checked now rather than at the first step; a reward source first, then data, as in TRL
        extra_funcs = self._tool_calling.reward_funcs if self._tool_calling else ()
        self.rewards = RewardScorer.from_config(args, reward_funcs, reward_processing_classes, extra_funcs)
        placeholder = None
        if train_dataset is None:  # only an environment can write the prompts then (its reset())
            if environment_factory is None:
                raise ValueError(  # TRL's message first
                    "`train_dataset` is required unless an `environment_factory` is provided. Pass a "
                    "datasets.Dataset or IterableDataset with a `prompt` column, or an environment_factory whose "
                    "reset() returns each prompt."
                )
            train_dataset = placeholder = placeholder_dataset(environment_factory, args)
        # Task metrics of evaluations (evaluation.py), resolved now: a name that loads nothing fails before training
        multi_turn = self._tool_calling is not None or rollout_func is not None
        self.task_metrics = task_metrics_of(args.eval_reward_funcs, self.rewards, multi_turn)
        # Columns each row must have (a rollout_func may supply reward arguments itself: then none up front); a
        # stream's later rows are checked as they are read against the same (data.checked_stream)
        required = self.rewards.required_columns() if rollout_func is None else {}
        task_columns = self.task_metrics.required_columns() if self.task_metrics is not None else {}
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self._stream_checks = {"train": required, "eval": {**required, **task_columns}, "max_positions": max_positions}
        check_datasets(train_dataset, eval_dataset, args, self._stream_checks, tokenizer, self._tool_calling, placeholder)  # fmt: skip

        self.reference = ReferencePolicy.from_config(args, model, self._model_path, quantization_config)
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
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if sharded and (args.prefix_sharing or args.drop_finished_rows):
            logger.warning("DeepSpeed / FSDP: prefix_sharing and drop_finished_rows are off (untested when sharded).")
        self.rollout_engine = RolloutEngine.from_config(
            args, processing_class, self.eos_token_ids, sharded, tool_calling=self._tool_calling
        )
        self._length_buckets = self.accelerator.num_processes == 1  # its forward count follows this rank's lengths
        self._start_hub_uploads()  # checkpoints and completions tables pushed in the background (hub_trainer.py)
        self._interrupt = SaveOnInterruptCallback()
        self.add_callback(self._interrupt)
        self._pre_training_logs = PreTrainingLogsCallback()
        self.add_callback(self._pre_training_logs)
        if self.reference.mode == "snapshot_adapter" or args.sync_ref_model:  # alpha = 1: the snapshot's reset
            alpha = args.ref_model_mixup_alpha if args.sync_ref_model else 1.0
            self.add_callback(ReferenceSyncCallback(self.reference, self.model, args.ref_model_sync_steps, alpha))
        if self.accelerator.is_main_process:
            logger.info(f"reference policy: {self.reference.mode} ({self.reference.memory_note(self.model)})")
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded weights cannot be scored here
            check_against_full_logits(self.model)
        self.reference.prepare(self.accelerator, self.is_deepspeed_enabled, args.cast_lm_head_to_fp32)
        for reward_model in self.rewards.reward_models:
            reward_model.to(self.accelerator.device)

        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.generation_config = self.rollout_engine.generation_config  # TRL's attribute: the sampling settings
        self.recorder = MetricsRecorder(self.accelerator, logs_size=args.generation_batch_size)
        self._metrics = self.recorder.values  # TRL's attribute, the same lists
        self._logs = self.recorder.logs  # TRL's attribute: the last generation batch's rows, rewards, advantages
        # A failing tracker or completions file is a warning, not the end of the run (reporting.py)
        self._logging = LoggingGuard()
        self._logging.guard_trackers(self.callback_handler.callbacks)
        self._unscored_task_metrics = set()  # task metrics warned about once (evaluation.TaskEvaluationMixin)
        # Run doctor: reads each log, adds doctor/* metrics, warns on the main process only (said once, not N times)
        self._doctor = (
            RunDiagnosis.from_config(args, speak=self.accelerator.is_main_process) if args.doctor_live else None
        )
        self._buffered_inputs = None  # the micro-batches of the last rollout, trained on until the next one
        self._episode = None  # the rollout under way's (engine.start), for _generate: TRL's hook takes prompts only
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
    def ref_model(self):
        """TRL's attribute: the frozen reference model when pi_ref is a copy of its own (`ref_model_mode="copy"`, the
        choice of `auto` for full fine-tuning with a KL term; mixed into by `sync_ref_model`). None, as in TRL, when
        there is no KL term, or when pi_ref lives on the PEFT policy itself (adapters disabled, or the snapshot
        adapter). Unlike TRL, a copy also exists with `beta=0` when `reward_kl_coef > 0` needs it."""
        return self.reference.model

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
            args = self.args
            self._buffered_inputs = micro_batches(
                rollout, args.steps_per_generation, args.gradient_accumulation_steps, args.max_completion_length,
                self.accelerator,
            )  # fmt: skip
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

        # Roll out (engine.py)
        episode = self.rollout_engine.start(rows)  # with environments: each row's instance reset, its tools
        episode.prompts = with_images(episode.prompts, rows)  # an image column's images as image parts, as TRL
        images = has_images(episode.prompts)
        self._episode = episode
        try:
            generation = Generation.from_trl(self._generate(episode.prompts))
        finally:
            self._episode = None
        if images and generation.vision is None:
            raise NotImplementedError(
                "The prompts hold images, but the rollout came from a rollout_func or a subclass's _generate, which "
                "grpo-ext cannot score with images yet: use the trainer's own generation for image datasets."
            )
        rollout = self.rollout_engine.to_rollout(
            generation, self.rollout_engine.plan(self.model, images=images), device
        )
        old_needed = mode == "train" and self._policy_moves_during_rollout
        rollout_per_token_logps = None
        if old_needed or self.args.reward_kl_coef > 0:  # log-probs of the policy that sampled the rollout
            rollout_per_token_logps = self._completion_logps(self.model, rollout)  # (B, C)
        rollout.old_per_token_logps = rollout_per_token_logps if old_needed else None
        if self.reference.mode != "none":  # one reference pass serves both penalties
            with self.reference.activate(self.model) as reference_model:
                rollout.ref_per_token_logps = self._completion_logps(reference_model, rollout)  # (B, C)

        # Score: the rewards of the whole group are needed for its advantages, so every process's are gathered
        local_rewards_per_func, logged_columns = self._score_rewards(mode, rows, episode, generation)  # (B, K)
        rewards_per_func = gather(local_rewards_per_func.to(device))  # (N, K)
        rewards = self.rewards.weighted_sum(rewards_per_func)  # (N,), N = B * num_processes
        penalty = self._reward_penalties(mode, rollout, rollout_per_token_logps)  # (N,)

        # Advantages
        if self.args.multi_objective_aggregation == "normalize_then_sum":  # GDPO: each function normalised first
            aggregated = self.rewards.weighted_sum(group_normalized_rewards(rewards_per_func, G)) - penalty
            advantages, std = batch_normalized_advantages(aggregated)
        else:
            aggregated = rewards - penalty
            advantages, std = group_relative_advantages(aggregated, G, self.args.scale_rewards)
        start = self.accelerator.process_index * len(rows)  # this process's rows
        rollout.advantages = advantages[start : start + len(rows)]  # (B,)
        rollout.group_std = group_std(aggregated, G)[start : start + len(rows)]  # (B,) for dynamic sampling

        tokens = self.recorder.rollout(mode, self.rewards.names, rewards_per_func, rewards, std, rollout)
        self.recorder.keep_logs(
            episode.prompts, generation.completions, self.rewards.names, rewards_per_func, advantages, logged_columns
        )
        if images and self.args.log_multimodal:  # each row's prompt images, as TRL's `_logs["images"]`
            self._logs["images"].extend(gather_object(generation.images))
        if mode == "train":
            self.state.num_input_tokens_seen += tokens
            self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        if penalty.any():
            self.recorder.add(mode, "reward_shaped", torch.nanmean(rewards - penalty).item())
        if self.args.log_completions and mode == "train":
            texts = self._tokenizer.batch_decode(generation.completion_ids, skip_special_tokens=True)
            self.recorder.keep_samples(
                self.state.global_step, episode.prompts, texts, self.rewards.names, rewards_per_func, rewards,
                advantages, logged_columns,
            )  # fmt: skip
        return rollout

    def _score_rewards(self, mode: str, rows: list[dict], episode, generation: Generation) -> tuple[torch.Tensor, dict]:
        """This process's rewards `(B, K)`: every reward function on the completions, with the rows' other columns,
        a rollout_func's extra fields and the environments as keyword arguments (TRL's contract); and the columns
        the reward functions logged with `log_extra` (all processes' rows), for the completions table."""
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}  # `image` too, as in TRL
        columns["trainer_state"] = self.state
        for key, values in generation.extra_fields.items():  # a list holds one value per row
            columns[key] = values if isinstance(values, list) else [values] * len(rows)
        if episode.environments is not None:
            columns["environments"] = episode.environments
        rewards_per_func = self.rewards.score(
            episode.prompts, generation.completions, generation.completion_ids, columns
        )  # (B, K)
        logged_metrics, logged_columns = self.rewards.gather_logs(self.accelerator, len(rows))
        for name, value in logged_metrics.items():  # what reward functions logged (log_metric, log_extra)
            self.recorder.add(mode, name, value)
        if self.args.nonfinite_rewards == "drop":
            dropped = self.accelerator.reduce(torch.tensor(self.rewards.nonfinite_counts, device=self.accelerator.device), "sum")  # fmt: skip
            for name, count in zip(self.rewards.names, dropped.tolist(), strict=True):
                self.recorder.add(mode, f"rewards/{name}/nonfinite", float(count))
        return rewards_per_func, logged_columns

    def _generate(self, prompts: list):
        """`trl.GRPOTrainer._generate`: G completions per prompt (the prompts repeated G times in a row), with the
        tool-calling rounds when the trainer has tools (engine.py). Returns, per row, unpadded lists: `(prompt_ids,
        completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images)`, `tool_mask` None
        without tools, `logprobs` None (no vLLM), no images. A subclass may override it; the rollout goes through it.
        With a `rollout_func`, its rollout (`engine.custom_rollout`).
        """
        if self.rollout_func is not None:
            return custom_rollout(self.rollout_func, prompts, self, self._tokenizer).as_trl()
        mode = "train" if self.model.training else "eval"
        engine, plan = self.rollout_engine, self.rollout_engine.plan(self.model, images=has_images(prompts))
        with unwrapped_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            checkpointing_kwargs=self.args.activation_checkpointing_kwargs,
        ) as unwrapped_model:
            num_generations = self.num_generations if mode == "train" else self.num_generations_eval
            generation = engine.generate(
                unwrapped_model, prompts, num_generations, plan, self._episode, device=self.accelerator.device
            )
        if self._tool_calling is not None:
            for name, value in tool_metrics(generation.turns, len(prompts), self.accelerator).items():
                self.recorder.add(mode, name, value)
        if generation.draft_stats is not None:  # speculative decoding: what the group's drafts saved
            self.recorder.add(mode, "speculative/acceptance_rate", generation.draft_stats.acceptance_rate)
            self.recorder.add(mode, "speculative/tokens_per_forward", generation.draft_stats.tokens_per_forward)
        return generation.as_trl()

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
        """beta_r * sum_t KL_t + overlong + missing-EOS, per completion of all processes `(N,)` (penalties.py)."""
        coef = self.reward_kl_controller.value if self.reward_kl_controller else self.args.reward_kl_coef
        penalty, means = reward_penalties(self.args, rollout, rollout_per_token_logps, coef, gather)  # (B,)
        for name, value in means.items():
            self.recorder.add(mode, name, value)
        if self.reward_kl_controller and mode == "train":  # this rollout used coef; the next one uses the update
            self.reward_kl_controller.update(means["penalty/reward_kl"], len(rollout) * self.accelerator.num_processes)
        return gather(penalty)

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
        self.recorder.objective(mode, terms, entropies.detach(), completion_mask)
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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- Metrics, with TRL's names ---

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self.recorder.means(mode)
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs = {**logs, **metrics}
        if self._doctor is not None:  # before super().log, so every tracker gets the doctor/* metrics too
            logs.update(self._doctor.observe(logs, self.state.global_step, mode))
        super().log(logs, start_time)
        samples = self.recorder.samples
        if self.args.log_completions and mode == "train" and samples and self.accelerator.is_main_process:
            self.recorder.samples = {}  # logged once, not again with the end-of-training summary
            log_completions_table(samples, self.args, self.state.global_step, self.rewards.names, self._logging)

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
            # Imported here: `python -m grpo_ext.doctor` runs that module as __main__, after the package imports this
            from .doctor import log_preflight

            log_preflight(self, self.args.doctor_steps)
        if checkpoint is not None and self._finished(checkpoint):
            return self._finished_output(checkpoint)
        self._pre_training_logs.entries = [entry for entry in self.state.log_history if entry.get("step") == 0]
        try:
            return super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            self._interrupt.restore_handlers()
            self._finish_completions_uploads()

    def _checkpoint_state(self) -> dict:
        """grpo-ext's state saved in each checkpoint beside the run's settings (checkpoints.ResumeMixin)."""
        state = {}
        if self.reward_kl_controller is not None:
            state["reward_kl_controller"] = self.reward_kl_controller.state_dict()
        if self.entropy_control.adaptive:
            state["entropy_control"] = self.entropy_control.state_dict()
        return state

    def _restore_checkpoint_state(self, state: dict) -> None:
        """On resume: the rollout schedule continues where it stopped (the next micro-step rolls out anew: no buffer
        is saved), the controllers where they were."""
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        if self.reward_kl_controller is not None and "reward_kl_controller" in state:
            self.reward_kl_controller.load_state_dict(state["reward_kl_controller"])
        if self.entropy_control.adaptive and "entropy_control" in state:
            self.entropy_control.load_state_dict(state["entropy_control"])
