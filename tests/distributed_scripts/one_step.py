"""One GRPO optimizer step per case, with injected completions; run by tests/test_distributed.py.

Launched twice with the same global batch: under `torchrun --nproc_per_node 2` (gloo, CPU) and as plain `python`
(one process, per_device_train_batch_size doubled). Each process writes `<out>/<case>/result_rank<r>.json`: the world
size it really got, its share of the rollout, its advantages, the logged metrics and the parameter update.

Why the completions are injected: sampling draws from each process's RNG, so two processes (each seeded alike but
given half the prompts) and one process (all prompts in one `generate` call) would sample different completions
and nothing could be compared. `GenerationMixin.generate` is replaced by a function of (prompt, position in its
group): the completion of the k-th copy of a prompt is a fixed token string (random digits and letters, an EOS or
none, varying lengths) whatever the process and batch it lands in. The position in the group is the row's index in
the global generation batch modulo num_generations, where rank r holds rows [r * B, (r + 1) * B): the layout
RepeatSampler + accelerate's BatchSamplerShard give (rank r takes the r-th per-process batch of the sampler's
stream); the test checks that layout by comparing the prompts each rank saw with the one-process run.

Cases marked `real_generation` keep HF's `generate` and sample with top_k=1 from a model warmed up to answer sums,
on two prompts whose completions have different lengths: under FSDP and ZeRO-3 every forward pass is a collective,
so the rank that finishes first must keep stepping until the other is done.

Why the policy is perturbed: at step 0 the policy equals its reference (a frozen copy, or the disabled LoRA adapter
whose B is 0), so `kl` would be 0 in both runs and prove nothing. Adding the same seeded noise to the trainable
parameters after the trainer is built (the frozen copy is not touched; LoRA B becomes non-zero) makes the KL term
and its gradient non-zero from the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import zlib
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from datasets import Dataset
from transformers import TrainerCallback

from grpo_ext import GRPOExtConfig, GRPOExtTrainer
from grpo_ext.models import four_bit_config
from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, make_tokenizer, record_trained_batches

HF_GENERATE = transformers.GenerationMixin.generate  # restored for the cases that really generate

MAX_COMPLETION_LENGTH = 8
GLOBAL_BATCH = 8  # completions per optimizer step, over all processes

QLORA = dict(lora=True, four_bit=True, gradient_checkpointing=True)  # 4-bit base + LoRA, as the QLoRA recipes run

# name -> settings; every case is one optimizer step with SGD, lr 1.0, no clipping (update == -gradient), except the
# resume cases (two steps, AdamW)
CASES = {
    "grpo": dict(loss_type="grpo", num_generations=4, save=True),  # 2 prompts x 4: one whole group per rank
    "dapo": dict(loss_type="dapo", num_generations=4),
    "grpo_lora": dict(loss_type="grpo", num_generations=4, lora=True, save=True),
    "grpo_qlora": dict(loss_type="grpo", num_generations=4, **QLORA),
    "grpo_split_group": dict(loss_type="grpo", num_generations=8),  # 1 prompt x 8: its group split 4 / 4 over ranks
    "dapo_accumulation": dict(loss_type="dapo", num_generations=4, gradient_accumulation_steps=2),
    "bnpo": dict(loss_type="bnpo", num_generations=4),  # control: a per-process token mean, expected to differ
    # Real sampling (top_k=1: deterministic) on a model warmed up to answer sums then stop: the two prompts of a step
    # get answers of different lengths, so the ranks finish generating at different steps and must keep in sync.
    # ... and then the task metrics of 3 held-out prompts (greedy and 2 samples each), shared out 2 / 1 over the ranks
    "generation": dict(loss_type="grpo", num_generations=4, real_generation=True, task_eval=True),
    # sharded engines (only in the two-process run; each is compared with its one-process twin, see the test)
    "fsdp": dict(loss_type="grpo", num_generations=4, fsdp=True, save=True),  # grpo, sharded with FSDP2
    "fsdp_lora": dict(loss_type="grpo", num_generations=4, fsdp=True, lora=True),
    "fsdp_qlora": dict(loss_type="grpo", num_generations=4, fsdp=True, **QLORA),
    "fsdp_generation": dict(loss_type="grpo", num_generations=4, fsdp=True, real_generation=True, task_eval=True),
    "zero2": dict(loss_type="grpo", num_generations=4, zero_stage=2, save=True),
    "zero2_lora": dict(loss_type="grpo", num_generations=4, zero_stage=2, lora=True),
    "zero2_qlora": dict(loss_type="grpo", num_generations=4, zero_stage=2, **QLORA),
    "zero3": dict(loss_type="grpo", num_generations=4, zero_stage=3, save=True),  # reference re-loaded, not copied
    "zero3_lora": dict(loss_type="grpo", num_generations=4, zero_stage=3, lora=True, save=True),
    "zero3_qlora": dict(loss_type="grpo", num_generations=4, zero_stage=3, **QLORA),
    "zero3_generation": dict(loss_type="grpo", num_generations=4, zero_stage=3, real_generation=True, task_eval=True),
    # ds3_gather_for_generation=False: generation with the weights left partitioned, each layer gathered as it runs
    "zero3_generation_partitioned": dict(
        loss_type="grpo", num_generations=4, zero_stage=3, real_generation=True, ds3_gather_for_generation=False
    ),
    # crash and resume: two steps straight == one step, a new trainer, resume_from_checkpoint, one more step
    "ddp_lora_resume": dict(loss_type="grpo", num_generations=4, lora=True, resume=True),
    "fsdp_resume": dict(loss_type="grpo", num_generations=4, fsdp=True, resume=True),
    "zero2_resume": dict(loss_type="grpo", num_generations=4, zero_stage=2, resume=True),
    "zero3_lora_resume": dict(loss_type="grpo", num_generations=4, zero_stage=3, lora=True, resume=True),
    # SIGTERM reaches rank 1 only, after step 1 of 3: both ranks must stop there and save the same checkpoint
    "ddp_interrupt": dict(loss_type="grpo", num_generations=4, lora=True, interrupt=True),
    "fsdp_interrupt": dict(loss_type="grpo", num_generations=4, fsdp=True, interrupt=True),
    "zero3_interrupt": dict(loss_type="grpo", num_generations=4, zero_stage=3, lora=True, interrupt=True),
}
DEEPSPEED_AUTO = dict.fromkeys(
    ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"], "auto"
)  # filled in from the training arguments
GENERATION_PROMPTS = ["1+2=", "9+9="]  # answers of one and two digits: generations that end at different steps
EVAL_PROMPTS = ["1+2=", "9+9=", "4+5="]  # an odd count: one rank gets a padding row


def completion_ids_for(prompt: str, k: int, tokenizer) -> list[int]:
    """The k-th completion of `prompt`: a fixed function of both (crc32, not hash(): the same in every process)."""
    rng = random.Random(zlib.crc32(f"{prompt}|{k}".encode()))
    alphabet = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789" + "abcdefghij"]
    length = rng.randint(1, MAX_COMPLETION_LENGTH)
    ids = [rng.choice(alphabet) for _ in range(length)]
    if length < MAX_COMPLETION_LENGTH or rng.random() < 0.5:  # most end with EOS, full-length ones may be truncated
        ids[-1] = tokenizer.eos_token_id
    return ids + [tokenizer.pad_token_id] * (MAX_COMPLETION_LENGTH - length)


def completion_length_score(completions, **kwargs) -> list[float]:
    """A task metric that tells completions apart whatever the (one-step-trained) model writes: their length."""
    return [len(completion) / MAX_COMPLETION_LENGTH for completion in completions]


class InjectedGeneration:
    """Replaces `GenerationMixin.generate`: prompt ids + the predetermined completion of each row."""

    def __init__(self, tokenizer, num_generations: int):
        self.tokenizer, self.num_generations = tokenizer, num_generations
        self.rows = []  # (prompt, completion ids) of this process, in order

    def __call__(self, model, input_ids=None, attention_mask=None, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        completions = []
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            global_row = rank * input_ids.size(0) + i
            completion = completion_ids_for(prompt, global_row % self.num_generations, self.tokenizer)
            completions.append(completion)
            self.rows.append((prompt, completion))
        return torch.cat([input_ids, torch.tensor(completions, device=input_ids.device)], dim=1)


class RecordUpdate(TrainerCallback):
    """Trainable parameters before the step's rollout and after its optimizer step, and the gradient the optimizer
    gets (after DDP's all-reduce). DeepSpeed steps inside `backward` and keeps gradients in its own partitions, so its
    cases record no gradient; their update is compared with the one-process update (itself checked against the
    gradient)."""

    def __init__(self):
        self.before, self.gradients, self.after = {}, {}, {}
        self.steps = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.steps += 1
        self.before = {name: _full(p) for name, p in _trainable(model)}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: _full(p.grad) for name, p in _trainable(model) if p.grad is not None}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after = {name: _full(p) for name, p in _trainable(model)}


def _gathered(parameters, modifier_rank=None):
    """DeepSpeed ZeRO-3 keeps each parameter partitioned: gather them whole inside this context (a collective)."""
    if not any(hasattr(p, "ds_id") for p in parameters):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


def _full(tensor):
    """A copy of the whole tensor: FSDP2 shards parameters and gradients as DTensors, ZeRO-3 partitions parameters
    (both gathers are collectives: every rank calls this)."""
    if hasattr(tensor, "full_tensor"):
        return tensor.detach().full_tensor().clone()
    with _gathered([tensor]):
        return tensor.detach().clone()


def _trainable(model):
    model = getattr(model, "module", model)
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def build_trainer(
    case: dict, model_path: str, warm_model_path: str, output_dir: Path, world_size: int, noise_seed=1234, **overrides
):
    """The case's trainer (SGD, lr 1, one step unless `overrides` say otherwise), its injected generation and the
    callback that records the update."""
    accumulation = case.get("gradient_accumulation_steps", 1)
    extra = {}
    if case.get("fsdp"):
        extra = dict(fsdp=True, fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"})
    if case.get("zero_stage"):
        zero = {"stage": case["zero_stage"], "stage3_gather_16bit_weights_on_model_save": True}
        extra = dict(deepspeed={"zero_optimization": zero, "zero_allow_untested_optimizer": True} | DEEPSPEED_AUTO)
    if "ds3_gather_for_generation" in case:
        extra["ds3_gather_for_generation"] = case["ds3_gather_for_generation"]
    if case.get("real_generation"):
        extra["top_k"] = 1  # sampling from the single most likely token: the same completions in every run
    if case.get("task_eval"):
        metric = "__main__:completion_length_score"  # this script runs as __main__ in every process
        extra |= dict(eval_reward_funcs=[metric], eval_num_samples=2, eval_task_metrics_only=True)
    else:  # completions are injected through GenerationMixin.generate: decode with it
        extra["drop_finished_rows"] = False
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=GLOBAL_BATCH // world_size // accumulation,
        gradient_accumulation_steps=accumulation,
        num_generations=case["num_generations"],
        max_completion_length=MAX_COMPLETION_LENGTH,
        loss_type=case["loss_type"],
        beta=0.04,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,  # no clipping: the update is exactly -lr * gradient
        lr_scheduler_type="constant",
        logging_steps=1,
        log_completions=True,
        save_strategy="steps" if case.get("save") else "no",
        save_steps=1,
        bf16=False,
        gradient_checkpointing=case.get("gradient_checkpointing", False),
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    args = GRPOExtConfig(**(settings | overrides))
    if case.get("fsdp") and os.environ.get("FORCE_FSDP_ON_CPU"):
        # accelerate's AcceleratorState turns on FSDP only from MULTI_GPU/NPU/XPU/..., never from MULTI_CPU: on CPU the
        # fsdp settings are silently dropped and the run is DDP. The arguments above have just (re)built the shared
        # PartialState (gloo, cpu); calling it MULTI_GPU makes the trainer's Accelerator take the FSDP path.
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState().distributed_type = DistributedType.MULTI_GPU
    if case.get("zero_stage"):
        # On CPU accelerate leaves DeepSpeed's communication layer to `deepspeed.initialize`, but ZeRO-3 partitions the
        # weights inside `from_pretrained`, before that: start it now, over the gloo group the arguments created.
        # DeepSpeed's optional shared-memory all-reduce (a C++ op compiled on first use, hardware-specific) is left
        # out: the engine then reduces through torch.distributed, as on GPUs.
        import deepspeed.comm.torch
        from deepspeed import comm

        deepspeed.comm.torch.build_shm_op = lambda: None
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    peft_config = None
    if case.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tokenizer = make_tokenizer()
    generation = InjectedGeneration(tokenizer, case["num_generations"])
    transformers.GenerationMixin.generate = lambda model, *a, **kw: generation(model, *a, **kw)
    dataset = make_prompt_dataset(8)
    if case.get("real_generation"):
        transformers.GenerationMixin.generate = HF_GENERATE
        model_path = warm_model_path
        dataset = Dataset.from_dict({"prompt": GENERATION_PROMPTS})
    update = RecordUpdate()
    trainer = GRPOExtTrainer(
        model_path,
        digit_fraction_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[update],
        quantization_config=four_bit_config(torch.float32) if case.get("four_bit") else None,
    )
    assert trainer.accelerator.num_processes == world_size, trainer.accelerator.num_processes
    if world_size > 1:
        assert dist.is_initialized() and dist.get_world_size() == world_size
        assert dist.get_backend() == "gloo", dist.get_backend()

    generator = torch.Generator().manual_seed(noise_seed)  # the same noise on every rank and in both runs
    trainable = [p for _, p in _trainable(trainer.model)]
    with torch.no_grad(), _gathered(trainable, modifier_rank=0):
        for p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return trainer, generation, update


def run_case(name: str, model_path: str, warm_model_path: str, out: Path, world_size: int) -> None:
    case = CASES[name]
    rank = int(os.environ.get("RANK", "0"))
    # one output_dir per rank, so the test can see which rank wrote which file
    trainer, generation, update = build_trainer(
        case, model_path, warm_model_path, out / name / f"rank{rank}", world_size
    )
    tokenizer, args = trainer.processing_class, trainer.args
    rollout = record_trained_batches(trainer)  # max_steps=1: the one rollout's micro-batches, this process's share
    trainer.train()
    if case.get("save"):
        trainer.save_model()
        trainer.save_state()

    if not case.get("real_generation"):
        expected = args.per_device_train_batch_size * args.gradient_accumulation_steps
        assert len(generation.rows) == expected, "generate was bypassed"
    rows = [
        (tokenizer.decode(prompt[prompt_mask.bool()]), completion[completion_mask.bool()].tolist())
        for mb in rollout
        for prompt, prompt_mask, completion, completion_mask in zip(
            mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask
        )
    ]
    result = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "num_processes": trainer.accelerator.num_processes,
        "process_index": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "rows": rows,  # (prompt, completion ids up to EOS) as the trainer kept them
        "advantages": torch.cat([mb.advantages for mb in rollout]).tolist(),
        "completion_tokens": int(sum(mb.completion_mask.sum() for mb in rollout)),
        "log_history": trainer.state.log_history,
        "gradient": {k: v.flatten().tolist() for k, v in update.gradients.items()},
        "update": {k: (update.before[k] - update.after[k]).flatten().tolist() for k in update.before},
    }
    if case.get("task_eval"):
        result["task_metrics"] = trainer.evaluate(Dataset.from_dict({"prompt": EVAL_PROMPTS}))
    _write(out / name, rank, result)


def run_resume_case(name: str, model_path: str, warm_model_path: str, out: Path, world_size: int) -> None:
    """Two optimizer steps straight, then step 2 again from the straight run's step-1 checkpoint in a new trainer
    (as after a crash). The new trainer starts from other weights (other noise) and AdamW is used, so a resume that
    lost the weights, the optimizer moments, the schedule or the data order would end elsewhere."""
    case = CASES[name]
    rank = int(os.environ.get("RANK", "0"))
    # one output_dir for both ranks, as on one machine: each engine's checkpoint is written by all ranks together
    folder = out / name / "run"
    adamw = dict(optim="adamw_torch", learning_rate=0.01, lr_scheduler_type="linear", save_strategy="steps")
    straight, _, _ = build_trainer(case, model_path, warm_model_path, folder, world_size, max_steps=2, **adamw)
    straight.train()
    trained = {name: _full(p) for name, p in _trainable(straight.model_wrapped)}
    del straight
    resumed, _, update = build_trainer(
        case, model_path, warm_model_path, folder, world_size, noise_seed=999, max_steps=2, **adamw
    )
    resumed.train(resume_from_checkpoint=str(folder / "checkpoint-1"))
    again = {name: _full(p) for name, p in _trainable(resumed.model_wrapped)}
    result = {
        "distributed_type": str(resumed.accelerator.distributed_type),
        "steps_run_after_resume": update.steps,
        "logged_steps": [entry["step"] for entry in resumed.state.log_history if "loss" in entry],
        "global_step": resumed.state.global_step,
        "max_difference": max((trained[k] - again[k]).abs().max().item() for k in trained),
        "step_2_update": max((update.before[k] - update.after[k]).abs().max().item() for k in update.before),
        "same_names": sorted(trained) == sorted(again),
    }
    _write(out / name, rank, result)


class SignalRankOne(TrainerCallback):
    """Sends SIGTERM to rank 1's own process at the end of step 1 (before the trainer's interrupt callback runs)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and int(os.environ.get("RANK", "0")) == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def run_interrupt_case(name: str, model_path: str, warm_model_path: str, out: Path, world_size: int) -> None:
    """Three steps planned; SIGTERM reaches rank 1 alone after step 1. Every rank must stop after step 1 with a
    checkpoint saved (a rank that went on would wait forever in the next step's collectives)."""
    case = CASES[name]
    rank = int(os.environ.get("RANK", "0"))
    folder = out / name / "run"  # shared by the ranks, as on one machine
    trainer, _, update = build_trainer(case, model_path, warm_model_path, folder, world_size, max_steps=3)
    trainer.callback_handler.callbacks.insert(0, SignalRankOne())
    trainer.train()
    result = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "steps_run": update.steps,
        "global_step": trainer.state.global_step,
        "interrupted": trainer.interrupted,
        "checkpoints": sorted(path.name for path in folder.glob("checkpoint-*")),
    }
    _write(out / name, rank, result)


def _write(case_dir: Path, rank: int, result: dict) -> None:
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / f"result_rank{rank}.json").write_text(json.dumps(result))
    print(f"case {case_dir.name} done on rank {rank}", flush=True)
    # TrainingArguments(deepspeed=...) sets a process-wide flag that the next case must not see
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--warm-model", required=True, help="a model that answers the sums, for real generation")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="comma-separated names of CASES")
    parser.add_argument("--world-size", type=int, required=True, help="the number of processes this run must have")
    args = parser.parse_args()
    for name in args.cases.split(","):
        case = CASES[name]
        run = run_resume_case if case.get("resume") else run_interrupt_case if case.get("interrupt") else run_case
        run(name, args.model, args.warm_model, Path(args.out), args.world_size)
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main()
