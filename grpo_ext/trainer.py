"""GRPOExtTrainer: orchestrates one GRPO step (docs/architecture.md, "One training step"); holds no formula inline.

sample (sampling) -> roll out (sampling) -> score (rewards) -> advantages (advantages) -> log-probs (logprobs,
reference) -> loss (objective) -> log.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import random
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from .advantages import group_relative_advantages, nanstd
from .callbacks import ReferenceSyncCallback, SaveOnInterruptCallback
from .checkpoints import check_resume_settings, explain_full_disk, last_complete_checkpoint
from .config import GRPOExtConfig
from .data import check_prompt_lengths, check_prompts, dataset_prompts
from .hub import (
    CheckpointUploads,
    HubPushError,
    model_card_for_output_dir,
    push_adapter_to_hub,
    save_training_config,
    training_config_dict,
)
from .logprobs import check_against_full_logits, completion_logps_and_entropies
from .models import apply_peft, disable_dropout, keep_4bit_weights_trainable, load_causal_lm, load_tokenizer
from .objective import aggregate_loss, grpo_per_token_loss
from .penalties import AdaptiveKLController, missing_eos_penalty, overlong_penalty, sequence_kl
from .plan import fit_batch_size
from .prefix_sharing import generate_with_shared_prefix, shared_prefix_logps, unique_prompts
from .reference import ReferencePolicy
from .rewards import RewardScorer
from .sampling import (
    build_generation_config,
    completion_mask_after_eos,
    concat_rollouts,
    eos_token_ids,
    is_conversational,
    prompt_texts,
    varying_groups,
)

logger = logging.getLogger(__name__)

# Trainer state beyond transformers' own, saved in each checkpoint folder.
STATE_FILE = "grpo_ext_state.json"

# Arguments every reward function receives besides the dataset columns.
REWARD_FUNCTION_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state"}


class GRPOExtTrainer(_BaseTrainer):
    """Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300), a drop-in for `trl.GRPOTrainer`.

    Args:
        model: a model id or local path (loaded with `args.model_init_kwargs`), or a `PreTrainedModel` / `PeftModel`.
        reward_funcs: one or a list of: `f(prompts, completions, completion_ids, **columns) -> list[float | None]`
            (sync or async), a sequence-classification reward model, or the id / path of one.
        args: a `GRPOExtConfig`.
        train_dataset, eval_dataset: datasets with a `prompt` column (text, or a list of chat messages); other
            columns are passed to the reward functions as keyword arguments.
        processing_class: the policy's tokenizer; loaded from the model's path when omitted.
        reward_processing_classes: tokenizers of the reward models, in the order of `reward_funcs`.
        callbacks, optimizers: as in `transformers.Trainer`.
        peft_config: a `peft.PeftConfig` to train an adapter instead of the full model.
        quantization_config: a `BitsAndBytesConfig` used when `model` is a string (QLoRA with `peft_config`).
    """

    # Tags on the model, as TRL's trainers add them (transformers' own pushes carry them); the model card is grpo-ext's
    _tag_names = ["trl", "grpo", "grpo-ext"]
    # compute_loss divides by the window's normalisers itself (objective.aggregate_loss)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        reward_funcs,
        args: GRPOExtConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        quantization_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GRPOExtConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-GRPO")
        elif not isinstance(args, GRPOExtConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; GRPOExtTrainer needs a GRPOExtConfig (same field names as "
                "trl.GRPOConfig: `from grpo_ext import GRPOExtConfig`)."
            )
        set_seed(args.seed)  # before the model is built: PEFT initialises adapters randomly

        # Model, tokenizer, adapter
        model_init_kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            model_init_kwargs["quantization_config"] = quantization_config
        model_path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        self._model_path = str(model_path or "")  # recorded in checkpoints, compared on resume
        model = keep_4bit_weights_trainable(load_causal_lm(model, model_init_kwargs))
        if args.gpu_memory_budget is not None:  # the largest micro-batch the memory planner predicts to fit
            print(fit_batch_size(args, model.config, peft_config, getattr(model, "is_loaded_in_4bit", False)))
        processing_class = (
            processing_class if processing_class is not None else load_tokenizer(model, model_init_kwargs)
        )
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        model.config.pad_token_id = processing_class.pad_token_id
        model.generation_config.pad_token_id = processing_class.pad_token_id
        self.eos_token_ids = eos_token_ids(model, processing_class)
        if peft_config is not None:
            model = apply_peft(model, peft_config, args.gradient_checkpointing)
        elif hasattr(model, "peft_config") and args.gradient_checkpointing:
            model.enable_input_require_grads()
        if args.disable_dropout:
            disable_dropout(model)

        # Rewards and data, checked now rather than at the first step
        self.rewards = RewardScorer(
            reward_funcs,
            reward_weights=args.reward_weights,
            reward_processing_classes=reward_processing_classes,
            model_init_kwargs=args.model_init_kwargs,
            chat_template_kwargs=args.chat_template_kwargs,
            nonfinite_rewards=args.nonfinite_rewards,
        )
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self._check_dataset(train_dataset, "train_dataset", args, processing_class, max_positions)
        for split, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
            name = f"eval_dataset[{split!r}]" if split else "eval_dataset"
            self._check_dataset(dataset, name, args, processing_class, max_positions)
        if eval_dataset is not None:
            self._check_eval_batch(args)

        zero3 = is_deepspeed_zero3_enabled()  # set by args.deepspeed: from_pretrained has partitioned the weights
        self.reference = ReferencePolicy.build(
            model,
            args.ref_model_mode,
            needed=args.beta > 0 or args.reward_kl_coef > 0,
            load_copy=(lambda: self._load_reference_copy(model_path, model_init_kwargs)) if zero3 else None,
            partitioned=zero3,
        )
        self.reward_kl_controller = None
        if args.reward_kl_target is not None:
            self.reward_kl_controller = AdaptiveKLController(
                args.reward_kl_coef, args.reward_kl_target, args.reward_kl_horizon
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=lambda features: features,  # rows stay dicts: prompts are tokenized at rollout time
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        # Two backbone passes in one forward are untested under DeepSpeed / FSDP sharding: plain path there
        self._prefix_sharing = args.prefix_sharing and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        self._uploads = CheckpointUploads()  # adapter checkpoints pushed in the background during training
        self._interrupt = SaveOnInterruptCallback()
        self.add_callback(self._interrupt)
        if self.reference.mode == "snapshot_adapter":
            self.add_callback(ReferenceSyncCallback(self.reference, self.model, args.ref_model_sync_steps))
        if self.accelerator.is_main_process:
            print(f"[grpo-ext] reference policy: {self.reference.mode} ({self.reference.memory_note(self.model)})")
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded weights cannot be scored here
            check_against_full_logits(self.model)
        if self.reference.model is not None:  # under DeepSpeed an inference engine, partitioned like the policy
            self.reference.model = (
                prepare_deepspeed(self.reference.model, self.accelerator)
                if self.is_deepspeed_enabled
                else self.accelerator.prepare_model(self.reference.model, evaluation_mode=True)
            )
        for reward_model in self.rewards.reward_models:
            reward_model.to(self.accelerator.device)

        self.num_generations = args.num_generations
        self.generation_config = build_generation_config(args, processing_class.pad_token_id, self.eos_token_ids)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Tokens behind each token-mean metric value, so `log` weights them: the logged kl / entropy / clip ratios are
        # then token means over everything since the last log, whatever the micro-batch and process split.
        self._metric_tokens = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._samples = {}  # columns of the last rollout's completions table, for log_completions
        self._buffered_inputs = None
        self._step = 0  # micro-steps taken, to know when to roll out again
        self._last_finite_step = 0  # last optimizer step after which every trainable weight was finite
        # dynamic sampling draws extra prompts from its own generator, different on each process
        self._refill_rng = random.Random(args.seed + 1000 * self.accelerator.process_index)

    @property
    def interrupted(self) -> bool:
        """True when SIGTERM or Ctrl-C stopped the last `train()` early (after saving a checkpoint)."""
        return self._interrupt.interrupted

    # --- Set-up checks ---

    @staticmethod
    def _load_reference_copy(model_path: str, model_init_kwargs: dict):
        """pi_ref under ZeRO-3: loaded again from where the policy came from (its weights are partitioned already)."""
        if not model_path:
            raise ValueError(
                "Under DeepSpeed ZeRO-3 the frozen reference is loaded again from the policy's path, and this model "
                "was built in memory: pass the model as an id or path, or use a PEFT adapter (reference = adapters off)."
            )
        return load_causal_lm(model_path, model_init_kwargs)

    def _check_dataset(self, dataset, name: str, args: GRPOExtConfig, tokenizer=None, max_positions=None) -> None:
        """Columns, size and reward-function arguments, then every prompt: type, emptiness, chat roles, length."""
        if dataset is None:
            return
        if isinstance(dataset, IterableDataset):
            raise NotImplementedError(f"{name} is an IterableDataset; GRPOExtTrainer needs a map-style Dataset.")
        columns = list(dataset.column_names)
        if "prompt" not in columns:
            raise ValueError(
                f"{name} has no 'prompt' column (columns: {columns}). Rename the column that holds the prompts, e.g. "
                "dataset = dataset.rename_column('question', 'prompt')."
            )
        prompts_per_rollout = args.generation_batch_size // args.num_generations
        if name == "train_dataset" and len(dataset) < prompts_per_rollout:
            raise ValueError(
                f"train_dataset has {len(dataset)} prompts but one rollout takes {prompts_per_rollout} "
                f"(generation_batch_size {args.generation_batch_size} / num_generations {args.num_generations}). "
                "Add prompts or lower per_device_train_batch_size / steps_per_generation."
            )
        for func, func_name in zip(self.rewards.funcs, self.rewards.names):
            missing = [column for column in self._required_columns(func) if column not in columns]
            if missing:
                raise ValueError(
                    f"Reward function '{func_name}' takes {missing} but {name} has no such column (columns: "
                    f"{columns}). Add the column to the dataset or give the argument a default value."
                )
        prompts = dataset_prompts(dataset)
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

    @staticmethod
    def _check_eval_batch(args: GRPOExtConfig) -> None:
        if (args.per_device_eval_batch_size * args.world_size) % args.num_generations:
            raise ValueError(
                f"per_device_eval_batch_size={args.per_device_eval_batch_size} x {args.world_size} process(es) is not "
                f"divisible by num_generations={args.num_generations}, so evaluation groups would be split. Set "
                f"per_device_eval_batch_size to a multiple of {args.num_generations}."
            )

    @staticmethod
    def _required_columns(func) -> list[str]:
        """Keyword arguments a reward function needs with no default: they must come from dataset columns."""
        if isinstance(func, torch.nn.Module):
            return []
        try:
            parameters = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            return []
        return [
            p.name
            for p in parameters
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in REWARD_FUNCTION_ARGUMENTS
        ]

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
        self._check_eval_batch(self.args)  # also for datasets given to evaluate() directly
        return RepeatSampler(data_source=eval_dataset, mini_repeat_count=self.num_generations, seed=self.args.seed)

    # --- One step ---

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._check_loss_is_finite(loss)
        return loss

    # --- Never a NaN update, never a NaN checkpoint ---

    def _check_loss_is_finite(self, loss: torch.Tensor) -> None:
        """Stop before the optimizer steps on a NaN / infinite loss (on any process: all stop together)."""
        nonfinite = self.accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "max")
        if bool(nonfinite.item()):
            step = self.state.global_step + 1
            raise FloatingPointError(
                f"The loss of step {step} is {loss.item()} (on this or another process); stopped before the optimizer "
                "step, so the weights are still those of the previous step. Rewards are checked for NaN / inf already "
                "(nonfinite_rewards), so look at the learning rate (lower it), bf16 / fp16 overflow, or max_grad_norm."
            )

    def _nonfinite_trainable_weights(self) -> list[str]:
        """Names of trainable parameters holding a NaN / inf on this process (empty when all are finite)."""
        return [
            name
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad and parameter.numel() and not bool(torch.isfinite(parameter.detach()).all())
        ]

    def _check_weights_are_finite(self, action: str) -> None:
        """Raise if any process holds a non-finite trainable weight, naming the step that made it so."""
        bad = self._nonfinite_trainable_weights()
        anywhere = self.accelerator.reduce(torch.tensor([float(bool(bad))], device=self.accelerator.device), "max")
        if not bool(anywhere.item()):
            self._last_finite_step = self.state.global_step
            return
        listed = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else " on another process"
        raise FloatingPointError(
            f"Refusing to {action}: trainable weights are NaN / infinite{listed} after step {self.state.global_step}; "
            f"they were finite after step {self._last_finite_step}, so step {self._last_finite_step + 1} went wrong. "
            "Resume from an earlier checkpoint with a lower learning rate (or max_grad_norm), and check the reward "
            "functions (nonfinite_rewards='error' names NaN / inf rewards)."
        )

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Once per optimizer step, before any checkpoint of that step is written
        self._check_weights_are_finite(f"go on after step {self.state.global_step}")
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _prepare_inputs(self, generation_batch: list[dict]) -> dict:
        if not self.model.training:
            return self._generate_and_score(generation_batch, mode="eval")
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            if self.args.dynamic_sampling:
                rollout = self._roll_out_varying_groups(generation_batch)
            else:
                rollout = self._generate_and_score(generation_batch, mode="train")
            rollout.pop("group_std")
            self._buffered_inputs = self._split_into_micro_batches(rollout)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    @property
    def _policy_moves_during_rollout(self) -> bool:
        """True when an optimizer step happens between a rollout and the use of its data: old log-probs needed."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0

    def _logps_and_entropies(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies `(B, C)` of the batch's completions, prompts shared where possible."""
        if self._prefix_sharing:
            return shared_prefix_logps(
                model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["completion_ids"],
                batch["completion_mask"],
                temperature=self.args.temperature,
                chunk_size=self.args.logprob_chunk_size,
            )
        return completion_logps_and_entropies(
            model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            batch["completion_ids"].size(1),
            temperature=self.args.temperature,
            chunk_size=self.args.logprob_chunk_size,
        )

    def _completion_logps(self, model, batch: dict) -> torch.Tensor:
        """Log-probs `(B, C)` without gradient (rollout, old and reference passes)."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.compute_loss_context_manager(),
        ):
            return self._logps_and_entropies(model, batch)[0]

    def _generate_and_score(self, rows: list[dict], mode: str) -> dict:
        """Roll out G completions per prompt, score them, and compute advantages and the log-probs the loss needs."""
        device = self.accelerator.device
        tokenizer = self.processing_class
        prompts = [row["prompt"] for row in rows]
        encoded = tokenizer(
            prompt_texts(prompts, tokenizer, self.args.chat_template_kwargs),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        prompt_ids, prompt_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)  # (B, P)
        if self.args.max_prompt_length is not None:  # left-padded: the last columns hold each prompt's last tokens
            prompt_ids = prompt_ids[:, -self.args.max_prompt_length :]
            prompt_mask = prompt_mask[:, -self.args.max_prompt_length :]

        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
        ):
            unique = unique_prompts(prompt_ids, prompt_mask, self.num_generations) if self._prefix_sharing else None
            if unique is not None:  # each prompt prefilled once, its KV cache shared by its G completions
                completion_ids = generate_with_shared_prefix(
                    unwrapped_model, *unique, self.num_generations, self.generation_config
                )  # (B, C)
            else:
                prompt_completion_ids = unwrapped_model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
                )
                completion_ids = prompt_completion_ids[:, prompt_ids.size(1) :]  # (B, C)
        completion_mask, is_truncated = completion_mask_after_eos(completion_ids, self.eos_token_ids)  # (B, C), (B,)
        completion_ids_list = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]
        lengths = completion_mask.sum(1)  # (B,) generated tokens, EOS included
        if self.args.mask_truncated_completions:
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1)
        texts = tokenizer.batch_decode(completion_ids_list, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(prompts[0]) else texts

        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
        }
        old_needed = mode == "train" and self._policy_moves_during_rollout
        rollout_per_token_logps = None
        if old_needed or self.args.reward_kl_coef > 0:  # log-probs of the policy that sampled the rollout
            rollout_per_token_logps = self._completion_logps(self.model, batch)  # (B, C)
        if old_needed:
            batch["old_per_token_logps"] = rollout_per_token_logps
        if self.reference.mode != "none":  # one reference pass serves both penalties
            with self.reference.activate(self.model) as reference_model:
                batch["ref_per_token_logps"] = self._completion_logps(reference_model, batch)  # (B, C)

        # Rewards of the whole group are needed for its advantages: gather them from every process.
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        columns["trainer_state"] = self.state
        local_rewards_per_func = self.rewards.score(prompts, completions, completion_ids_list, columns)  # (B, K)
        if self.args.nonfinite_rewards == "drop":
            dropped = self.accelerator.reduce(torch.tensor(self.rewards.nonfinite_counts, device=device), "sum")
            for name, count in zip(self.rewards.names, dropped.tolist()):
                self._metrics[mode][f"rewards/{name}/nonfinite"].append(float(count))
        rewards_per_func = gather(local_rewards_per_func.to(device))  # (B * num_processes, K)
        rewards = self.rewards.weighted_sum(rewards_per_func)  # (B * num_processes,)
        penalty = self._reward_penalties(mode, batch, rollout_per_token_logps, lengths, is_truncated)
        shaped_rewards = rewards - penalty  # (B * num_processes,)
        advantages, std = group_relative_advantages(shaped_rewards, self.num_generations, self.args.scale_rewards)
        process_slice = slice(
            self.accelerator.process_index * len(rows), (self.accelerator.process_index + 1) * len(rows)
        )
        batch["advantages"] = advantages[process_slice]  # (B,)
        batch["group_std"] = std[process_slice]  # (B,) for dynamic sampling

        self._log_rollout(mode, rewards_per_func, rewards, std, prompt_mask, lengths, is_truncated)
        if penalty.any():
            self._metrics[mode]["reward_shaped"].append(torch.nanmean(shaped_rewards).item())
        if self.args.log_completions and mode == "train":
            self._samples = {
                "step": [self.state.global_step] * rewards.numel(),
                "prompt": [str(p) for p in gather_object(prompts)],
                "completion": gather_object(texts),
                **{name: rewards_per_func[:, k].tolist() for k, name in enumerate(self.rewards.names)},
                "reward": rewards.tolist(),
                "advantage": advantages.tolist(),
            }
        return batch

    def _roll_out_varying_groups(self, rows: list[dict]) -> dict:
        """DAPO's dynamic sampling: keep groups whose rewards vary, roll out fresh prompts until the batch is full
        of them or `max_sampling_rounds` is reached, then top up with dropped groups (their advantages are 0)."""
        G, needed = self.num_generations, len(rows) // self.num_generations
        kept, dropped, rounds = [], [], 0
        while True:
            rounds += 1
            rollout = self._generate_and_score(rows, mode="train")
            varying = varying_groups(rollout["group_std"], G).tolist()  # (groups,)
            for group, keep in enumerate(varying):
                (kept if keep else dropped).append({k: v[group * G : (group + 1) * G] for k, v in rollout.items()})
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
        return concat_rollouts(groups)

    def _reward_penalties(self, mode, batch, rollout_per_token_logps, lengths, is_truncated) -> torch.Tensor:
        """beta_r * sum_t KL_t + overlong + missing-EOS, per completion of all processes `(B * num_processes,)`."""
        args, metrics = self.args, self._metrics[mode]
        penalty = torch.zeros(lengths.size(0), device=lengths.device)  # (B,)
        if args.reward_kl_coef > 0:
            coef = self.reward_kl_controller.value if self.reward_kl_controller else args.reward_kl_coef
            kl = sequence_kl(
                rollout_per_token_logps,
                batch["ref_per_token_logps"],
                batch["completion_mask"],
                args.reward_kl_estimator,
            )  # (B,)
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

    def _split_into_micro_batches(self, rollout: dict) -> list[dict]:
        """Slice a rollout into steps_per_generation micro-batches and attach the normalisers of their window.

        The window is the gradient_accumulation_steps micro-batches summed into one optimizer step. When the rollout
        covers whole windows (steps_per_generation a multiple of gradient_accumulation_steps, the default), counts are
        exact; otherwise they are the rollout's counts scaled to one window, as TRL does.
        """
        steps, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        size = rollout["completion_ids"].size(0) // steps
        micro_batches = [{k: v[i * size : (i + 1) * size] for k, v in rollout.items()} for i in range(steps)]
        tokens = torch.stack([mb["completion_mask"].sum() for mb in micro_batches]).float()  # (steps,)
        if steps % accumulation == 0:
            window_tokens = tokens.view(-1, accumulation).sum(1).repeat_interleave(accumulation)  # (steps,)
        else:
            window_tokens = tokens.sum().expand(steps) * accumulation / steps
        global_window_tokens = self.accelerator.reduce(window_tokens.clone(), reduction="sum")  # (steps,)
        for i, micro_batch in enumerate(micro_batches):
            micro_batch["num_sequences"] = float(size * accumulation)
            micro_batch["num_tokens"] = float(window_tokens[i])
            micro_batch["num_tokens_per_process"] = float(global_window_tokens[i]) / self.accelerator.num_processes
        return micro_batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GRPOExtTrainer.compute_loss does not return outputs.")
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]  # (B, C)
        per_token_logps, entropies = self._logps_and_entropies(model, inputs)  # (B, C) each
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:  # the policy has not moved since the rollout: pi_old == pi_theta
            old_per_token_logps = per_token_logps.detach()
        terms = grpo_per_token_loss(
            per_token_logps,
            old_per_token_logps,
            inputs["advantages"],
            completion_mask,
            ref_per_token_logps=inputs.get("ref_per_token_logps"),
            beta=self.args.beta,
            epsilon_low=self.args.epsilon,
            epsilon_high=self.args.epsilon_high,
            importance_sampling_level=self.args.importance_sampling_level,
            kl_estimator=self.args.kl_estimator,
        )
        if mode == "train":
            # A window cut short at the end of an epoch holds current_gradient_accumulation_steps micro-batches
            accumulation = self.args.gradient_accumulation_steps
            window = getattr(self, "current_gradient_accumulation_steps", accumulation) / accumulation
            num_sequences = inputs["num_sequences"] * window
            num_tokens = inputs["num_tokens"] * window
            num_global_tokens = inputs["num_tokens_per_process"] * window
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
        self._log_objective(mode, terms, entropies, completion_mask)
        return loss

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
        if terms.ratio.size(-1) == 1:  # sequence-level ratio: every token of a sequence shares its clipping
            mask = torch.ones_like(terms.ratio)
        low, high = terms.is_low_clipped.float(), terms.is_high_clipped.float()
        self._log_token_mean(mode, ["clip_ratio/low_mean"], low, mask)
        self._log_token_mean(mode, ["clip_ratio/high_mean"], high, mask)
        self._log_token_mean(mode, ["clip_ratio/region_mean"], torch.maximum(low, high), mask)
        per_sequence = lambda x: (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # noqa: E731
        metrics["clip_ratio/low_min"].append(gather(per_sequence(low)).min().item())
        metrics["clip_ratio/high_max"].append(gather(per_sequence(high)).max().item())

    def _log_rollout(self, mode, rewards_per_func, rewards, std, prompt_mask, lengths, is_truncated):
        metrics = self._metrics[mode]
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
        lengths = gather(lengths)  # (B * num_processes,)
        truncated = gather(is_truncated)
        terminated = lengths[~truncated].float()
        metrics["completions/mean_length"].append(lengths.float().mean().item())
        metrics["completions/min_length"].append(lengths.float().min().item())
        metrics["completions/max_length"].append(lengths.float().max().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
        if terminated.numel() == 0:
            terminated = torch.zeros(1)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())

    # --- Training, checkpoints and resume ---

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, plus: `resume_from_checkpoint=True` (or the string "true" a command line gives) resumes
        from the newest *complete* checkpoint of `output_dir`, skipping with a warning folders a killed process left
        half-written; a checkpoint made with another `num_generations` or `loss_type` is refused, one made from
        another model path warned about; and the SIGTERM / Ctrl-C handlers installed for training are put back when
        `train()` returns or raises.
        """
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            check_resume_settings(self._saved_run_settings(checkpoint), self._run_settings(), checkpoint)
        try:
            return super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            self._interrupt.restore_handlers()

    def _resolve_checkpoint(self, resume_from_checkpoint) -> str | None:
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "false"):
            if not os.path.isdir(resume_from_checkpoint):
                resume_from_checkpoint = resume_from_checkpoint.lower() == "true"
        if resume_from_checkpoint is True:
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-N folder. "
                    "Train from the start (resume_from_checkpoint=False), or pass a checkpoint folder."
                )
            return checkpoint
        return os.fspath(resume_from_checkpoint) if resume_from_checkpoint else None

    def _run_settings(self) -> dict:
        """Settings a checkpoint is tied to (checkpoints.RESUME_MUST_MATCH / RESUME_SHOULD_MATCH)."""
        return {
            "num_generations": self.args.num_generations,
            "loss_type": self.args.loss_type,
            "model": self._model_path,
        }

    @staticmethod
    def _saved_run_settings(checkpoint: str) -> dict:
        """The settings recorded in a checkpoint's STATE_FILE; empty for checkpoints written before they were."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            return {}
        with open(path) as file:
            return json.load(file).get("run", {})

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
        self._check_weights_are_finite(f"save checkpoint-{self.state.global_step}")
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with explain_full_disk(folder):
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                state = {"run": self._run_settings()}
                if self.reward_kl_controller is not None:
                    state["reward_kl_controller"] = self.reward_kl_controller.state_dict()
                with open(os.path.join(folder, STATE_FILE), "w") as file:
                    json.dump(state, file, indent=2)
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on resume by every backend (DDP, DeepSpeed, FSDP), after the TrainerState is restored.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        # Continue the rollout schedule where it stopped (the next micro-step rolls out anew: no buffer is saved).
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        path = os.path.join(checkpoint, STATE_FILE)
        if self.reward_kl_controller is not None and os.path.isfile(path):
            with open(path) as file:
                state = json.load(file)
            if "reward_kl_controller" in state:
                self.reward_kl_controller.load_state_dict(state["reward_kl_controller"])

    # --- Hub: adapters only, with grpo-ext's model card (hub.py); full models go through transformers ---

    def _is_adapter(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

    def _hub_repo_id(self, model_name=None) -> str:
        return self.hub_model_id or self.args.hub_model_id or model_name or Path(self.args.output_dir).absolute().name

    def _model_card(self, folder, repo_id, dataset_name=None) -> str:
        base_model = getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", None) or None
        return model_card_for_output_dir(
            folder,
            repo_id,
            base_model=base_model,
            datasets=dataset_name,
            reward_funcs=self.rewards.names,
            training_config=training_config_dict(self.args),
            log_history=self.state.log_history,
        )

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        card = self._model_card(self.args.output_dir, self._hub_repo_id(model_name), dataset_name)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as file:
            file.write(card)

    def _save_card_assets(self, folder) -> None:
        """The training config (tokens removed) and the curves PNG, next to the adapter."""
        save_training_config(self.args, folder)
        try:
            from .plot import plot_training_curves

            plot_training_curves(folder)
        except (ImportError, ValueError) as error:  # no matplotlib, or nothing logged yet: push without curves
            print(f"no training curves: {error}")

    def init_hf_repo(self, token=None):
        # Called at start-up with push_to_hub: an unreachable Hub must not stop a run that can push later
        try:
            super().init_hf_repo(token)
        except Exception as error:
            self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            self.push_in_progress = None
            logger.warning(
                "Could not create or reach the Hub repository %s (%s: %s). Training goes on: checkpoint uploads are "
                "tried in the background, and the final push_to_hub() says whether it worked.",
                self.hub_model_id,
                type(error).__name__,
                error,
            )

    def push_to_hub(
        self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs
    ):
        """Upload the result (adapter: `hub.push_adapter_to_hub`'s allow-list; full model: transformers' push).

        A failed upload raises `HubPushError`, which says that the local result in `output_dir` is intact (it is
        saved before the upload starts) and how to push it again.
        """
        repo_id = self._hub_repo_id(kwargs.get("model_name"))
        try:
            return self._push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        except HubPushError:
            raise
        except Exception as error:
            raise HubPushError(
                f"Pushing {self.args.output_dir} to the Hub repository {repo_id} failed ({type(error).__name__}: "
                f"{error}). The trained model is saved and intact in {self.args.output_dir}; push it again with "
                "trainer.push_to_hub() once the Hub is reachable (an adapter also with "
                f"grpo_ext.hub.push_adapter_to_hub({str(self.args.output_dir)!r}, {repo_id!r}))."
            ) from error

    def _push_to_hub(self, commit_message, blocking, token, revision, private, **kwargs):
        if not self._is_adapter():
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._uploads.finish()  # a checkpoint upload still running would race this one
        self.save_state()
        self._save_card_assets(self.args.output_dir)
        self.create_model_card(model_name=kwargs.get("model_name"), dataset_name=kwargs.get("dataset_name"))
        return push_adapter_to_hub(
            self.args.output_dir,
            self._hub_repo_id(kwargs.get("model_name")),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision,
        )

    def _push_from_checkpoint(self, checkpoint_folder):
        # transformers would upload training_args.bin and every file of the output folder: push the adapter only,
        # in the background (CheckpointUploads), so a slow or failing upload neither blocks nor stops training.
        if not self._is_adapter():
            return super()._push_from_checkpoint(checkpoint_folder)
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if self._uploads.busy() and not self.args.hub_always_push:  # as transformers: skip while one runs
            return
        self._save_card_assets(checkpoint_folder)
        repo_id = self._hub_repo_id()
        upload = functools.partial(
            push_adapter_to_hub,
            checkpoint_folder,
            repo_id,
            token=self.args.hub_token,
            private=self.args.hub_private_repo,
            commit_message=f"Training in progress, step {self.state.global_step}",
            revision=self.args.hub_revision,
            model_card=self._model_card(checkpoint_folder, repo_id),
        )
        self._uploads.submit(checkpoint_folder, upload)

    def _finish_current_push(self):
        # End of training (and transformers' push_to_hub): wait for checkpoint uploads, retry a failed one once
        super()._finish_current_push()
        if hasattr(self, "_uploads"):
            self._uploads.finish()

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
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
        self._metric_tokens[mode].clear()
        if self.args.log_completions and mode == "train" and self._samples and self.accelerator.is_main_process:
            self._log_completions_table()
            self._samples = {}  # logged once, not again with the end-of-training summary

    def _log_completions_table(self) -> None:
        """Print a few of the last rollout's completions and send the whole table to wandb / trackio if they run."""
        samples, shown = self._samples, self.args.num_completions_to_print
        rows = list(zip(*samples.values()))
        lines = [f"step {self.state.global_step} completions:"]
        lines += [
            f"  reward {reward:+.3f} advantage {advantage:+.2f} | {prompt!r} -> {completion!r}"
            for prompt, completion, reward, advantage in zip(
                samples["prompt"][:shown], samples["completion"][:shown], samples["reward"], samples["advantage"]
            )
        ]
        print("\n".join(lines))
        if "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(columns=list(samples), data=rows)}, step=self.state.global_step)
        if "trackio" in self.args.report_to:
            import trackio

            trackio.log({"completions": trackio.Table(columns=list(samples), data=rows)}, step=self.state.global_step)
