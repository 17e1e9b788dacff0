"""Two processes run the same GRPO step as one process with the same global batch (DDP, FSDP2, ZeRO-2/3 on CPU).

`tests/distributed_scripts/one_step.py` trains a tiny model for one optimizer step (SGD, lr 1.0, no clipping, constant
schedule: the update is minus the gradient) in each of several cases, twice:

- under `python -m torch.distributed.run --nproc_per_node 2` (torchrun; gloo on CPU), per_device_train_batch_size 4;
- under plain `python` (one process), per_device_train_batch_size 8: the same 8 completions per step.

Both runs must roll out the same completions or nothing can be compared, and sampling cannot give that (each process
draws from its own RNG on its own half of the prompts). Most cases replace `GenerationMixin.generate` with a fixed
function of (prompt, position of the row in its group), and the position is the row's index in the *global*
generation batch modulo num_generations. That the rows really are where the script assumes (rank r holds the r-th
contiguous chunk, as TRL's RepeatSampler + accelerate's BatchSamplerShard give) is checked here by comparing each
rank's prompts with the one-process run. The `*generation` cases sample for real, from a model warmed up to answer
sums, with top_k=1 (deterministic): the two ranks' generations end at different steps, which sharded engines must
survive (every rank keeps running forward passes until all are done). The trainable parameters get the same seeded
noise after the trainer is built, so the policy differs from its reference and the KL term (beta 0.04) is not 0.

Checked per case: the world size and engine each process really got; identical rollouts and advantages (with a group
split across the two ranks too, so rewards must be gathered before advantages); equal logged loss and parameter update
(atol 1e-6) for grpo (per-sequence means over all sequences), dapo (tokens over the global token count, also with
gradient accumulation), LoRA and LoRA on a 4-bit bitsandbytes base with gradient checkpointing (QLoRA + DDP, as the
recipes run it; the QLoRA cases of the sharded engines too); metrics equal to the one-process run and identical on
both ranks (reduced, not local); only rank 0 writing files and printing logs. bnpo, a per-process token mean by
definition, is the control that shows the comparison would catch a per-process normaliser.

Sharded engines, each compared with its one-process twin (the same case unsharded): FSDP2 (full model, LoRA, QLoRA,
real generation), DeepSpeed ZeRO-2 (full model, LoRA, QLoRA) and ZeRO-3 (full model, LoRA, QLoRA, real generation with
the weights gathered and, with ds3_gather_for_generation=False, left partitioned); the model FSDP (FULL_STATE_DICT)
and ZeRO-3 (gathered 16-bit save) write equals the one-process model. Crash and resume under DDP (LoRA), FSDP2, ZeRO-2
and ZeRO-3 (LoRA): a new trainer, from other weights, resumed from the step-1 checkpoint ends step 2 where two
straight steps end (AdamW, so the optimizer moments must come back too).

FSDP on CPU: accelerate 1.15 switches to DistributedType.FSDP only from a GPU-like distributed type (AcceleratorState
checks MULTI_GPU/NPU/XPU/...), so on CPU `fsdp=...` is silently ignored and the run is plain DDP. With
FORCE_FSDP_ON_CPU set (here), the script flips that gate after the arguments are built; FSDP2 then shards the tiny
model over gloo. DeepSpeed on CPU: the script starts DeepSpeed's communication layer over the gloo group itself (on
GPUs accelerate does it); the DeepSpeed cases need `deepspeed` (in the dev extra) and are left out without it. The
recipes' accelerate configs are also parsed through accelerate's own launcher code down to its FSDP / DeepSpeed
plugins."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_ext.testing import make_prompt_dataset, make_tiny_model, make_tokenizer, save_tiny_model, supervised_warm_up

pytestmark = pytest.mark.slow  # several processes: `make test-all` (and CI), not the fast tier

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_scripts" / "one_step.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None  # in the dev extra; optional for users
# run in both launches:
CASES = ["grpo", "dapo", "grpo_lora", "grpo_qlora", "grpo_split_group", "dapo_accumulation", "bnpo", "generation"]
# sharded engines, two processes only, each the same step as its one-process twin
ONE_PROCESS_TWIN = {
    "fsdp": "grpo",
    "fsdp_lora": "grpo_lora",
    "fsdp_qlora": "grpo_qlora",
    "fsdp_generation": "generation",
}
ZERO_CASES = {"zero2": "grpo", "zero2_lora": "grpo_lora", "zero2_qlora": "grpo_qlora"}
ZERO_CASES |= {
    "zero3": "grpo",
    "zero3_lora": "grpo_lora",
    "zero3_qlora": "grpo_qlora",
    "zero3_generation": "generation",
}
ZERO_CASES["zero3_generation_partitioned"] = "generation"  # ds3_gather_for_generation=False
# two processes only: two steps straight against one step + a new trainer resumed from the checkpoint + one step
RESUME_CASES = ["ddp_lora_resume", "fsdp_resume"]
# two processes only: SIGTERM reaches one rank; both must stop at the same step and save one checkpoint
INTERRUPT_CASES = ["ddp_interrupt", "fsdp_interrupt"]
if HAS_DEEPSPEED:
    ONE_PROCESS_TWIN |= ZERO_CASES
    RESUME_CASES += ["zero2_resume", "zero3_lora_resume"]
    INTERRUPT_CASES += ["zero3_interrupt"]
COMPARED = CASES + list(ONE_PROCESS_TWIN)  # every case whose step is compared with a one-process step
# DDP, then FSDP, then DeepSpeed: each engine leaves process-wide settings (accelerate's state, environment variables)
# that the cases after it would otherwise trip over. sorted() is stable: the order within an engine stays.
ENGINE_ORDER = {"fsdp": 1, "zero": 2}
CASES_TWO_PROCESSES = sorted(
    CASES + list(ONE_PROCESS_TWIN) + RESUME_CASES + INTERRUPT_CASES, key=lambda c: ENGINE_ORDER.get(c[:4], 0)
)
MATCHING = [case for case in COMPARED if case != "bnpo"]
SAVING = ["grpo", "grpo_lora", "fsdp", *(["zero2", "zero3", "zero3_lora"] if HAS_DEEPSPEED else [])]
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict:
    launcher_variables = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_variables and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", FORCE_FSDP_ON_CPU="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs, launched side by side; returns their output folders and their stdout."""
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_model(root / "model")
    tokenizer = make_tokenizer()
    warm = make_tiny_model("qwen2", tokenizer)
    supervised_warm_up(warm, tokenizer, make_prompt_dataset(100), steps=150)  # answers "1+2=" with "3" + EOS
    warm.save_pretrained(root / "warm_model")
    tokenizer.save_pretrained(root / "warm_model")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    common = ["--model", model, "--warm-model", str(root / "warm_model"), "--out"]
    two = subprocess.Popen(
        [*torchrun, str(SCRIPT), *common, str(root / "two"), "--cases", ",".join(CASES_TWO_PROCESSES)]
        + ["--world-size", "2"],
        env=_environment(),
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        one = subprocess.run(
            [sys.executable, str(SCRIPT), *common, str(root / "one"), "--cases", ",".join(CASES), "--world-size", "1"],
            env=_environment(),
            cwd=root,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        two_output, _ = two.communicate(timeout=TIMEOUT)
    finally:
        if two.poll() is None:
            two.kill()
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-5000:]
    assert two.returncode == 0, two_output[-8000:]
    return {"root": root, "one": one.stdout, "two": two_output}


def _result(runs, run: str, case: str, rank: int = 0) -> dict:
    return json.loads((runs["root"] / run / case / f"result_rank{rank}.json").read_text())


def _step_log(result: dict) -> dict:
    (entry,) = [entry for entry in result["log_history"] if "loss" in entry]
    return entry


def _distributed_type(case: str) -> str:
    engine = "FSDP" if case.startswith("fsdp") else "DEEPSPEED" if case.startswith("zero") else "MULTI_CPU"
    return f"DistributedType.{engine}"


def _max_abs(tensors: dict) -> float:
    return max(torch.tensor(v).abs().max().item() for v in tensors.values())


@pytest.mark.parametrize("case", COMPARED)
def test_each_launch_has_the_processes_it_claims(runs, case):
    one = _result(runs, "one", ONE_PROCESS_TWIN.get(case, case))
    assert (one["world_size"], one["num_processes"], one["distributed_type"]) == (1, 1, "DistributedType.NO")
    expected_type = _distributed_type(case)
    for rank in (0, 1):
        two = _result(runs, "two", case, rank)
        assert (two["world_size"], two["num_processes"], two["process_index"]) == (2, 2, rank)
        assert two["distributed_type"] == expected_type


@pytest.mark.parametrize("case", COMPARED)
def test_ranks_hold_contiguous_halves_of_the_same_rollout(runs, case):
    one = _result(runs, "one", ONE_PROCESS_TWIN.get(case, case))
    rank0, rank1 = _result(runs, "two", case, 0), _result(runs, "two", case, 1)
    assert len(rank0["rows"]) == len(rank1["rows"]) == len(one["rows"]) // 2
    assert rank0["rows"] + rank1["rows"] == one["rows"]  # same prompts, same order, same completion ids
    # Group-relative advantages from rewards gathered over both ranks, also when a group straddles them
    torch.testing.assert_close(
        torch.tensor(rank0["advantages"] + rank1["advantages"]), torch.tensor(one["advantages"]), atol=1e-6, rtol=0
    )
    if case == "grpo_split_group":
        assert {prompt for prompt, _ in rank0["rows"]} == {prompt for prompt, _ in rank1["rows"]}  # one group, split
        assert abs(sum(rank0["advantages"])) > 0.1  # so advantages from rank 0's half alone would be wrong
    if case.endswith("generation"):  # sampled (greedily), not injected: each rank's generation ends at another step
        lengths = [{len(completion) for _, completion in rank["rows"]} for rank in (rank0, rank1)]
        assert len(lengths[0]) == len(lengths[1]) == 1 and lengths[0] != lengths[1], lengths
    # Different token counts per rank: a normaliser over the wrong tokens would change the gradient
    assert rank0["completion_tokens"] != rank1["completion_tokens"]


@pytest.mark.parametrize("case", MATCHING)
def test_loss_and_update_match_one_process(runs, case):
    one = _result(runs, "one", ONE_PROCESS_TWIN.get(case, case))
    rank0, rank1 = _result(runs, "two", case, 0), _result(runs, "two", case, 1)
    assert _step_log(rank0)["loss"] == pytest.approx(_step_log(one)["loss"], abs=1e-6)
    assert set(rank0["update"]) == set(one["update"])
    assert _max_abs(one["update"]) > 1e-2  # the step moved the model
    for name, update in one["update"].items():
        # SGD, lr 1, no clipping: the update is the (all-reduced) gradient
        torch.testing.assert_close(torch.tensor(update), torch.tensor(one["gradient"][name]), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(rank0["update"][name]), torch.tensor(update), atol=1e-6, rtol=0)
        assert rank1["update"][name] == rank0["update"][name], name  # replicas stay identical
    if "lora" in case:
        assert all("lora_" in name for name in one["update"])


def test_per_process_normaliser_would_be_caught(runs):
    """bnpo divides by this process's tokens: with unequal token counts per rank the update must differ."""
    one, two = _result(runs, "one", "bnpo"), _result(runs, "two", "bnpo")
    difference = max(
        (torch.tensor(two["update"][name]) - torch.tensor(update)).abs().max().item()
        for name, update in one["update"].items()
    )
    assert difference > 1e-3


# Computed once per rollout from gathered values; the token means (kl, entropy, clip_ratio/*) are tested below.
ROLLOUT_METRICS = ["reward", "reward_std", "rewards/digit_fraction_reward/mean", "frac_reward_zero_std", "num_tokens"]
ROLLOUT_METRICS += ["completions/mean_length", "completions/min_length", "completions/max_length"]
ROLLOUT_METRICS += ["completions/clipped_ratio", "completions/mean_terminated_length"]


@pytest.mark.parametrize("case", MATCHING)
def test_metrics_are_reduced_across_processes(runs, case):
    one = _step_log(_result(runs, "one", ONE_PROCESS_TWIN.get(case, case)))
    rank0, rank1 = _step_log(_result(runs, "two", case, 0)), _step_log(_result(runs, "two", case, 1))
    assert rank1 == rank0  # every rank logs the reduced values, not its own
    assert one["kl"] > 1e-3 and set(one) == set(rank0)
    keys = ROLLOUT_METRICS if case == "dapo_accumulation" else [k for k in one if not isinstance(one[k], str)]
    for key in ["reward", "kl", "completions/mean_length", *keys]:
        assert rank0[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    "case", [c for c in COMPARED if ONE_PROCESS_TWIN.get(c, c) == "generation" and "part" not in c]
)
def test_task_metrics_are_gathered_from_every_process(runs, case):
    """evaluate()'s task metrics: 3 prompts shared out 2 / 1 (the short rank pads), gathered: the same on every rank
    as in one process."""
    one = _result(runs, "one", "generation")["task_metrics"]
    rank0, rank1 = (_result(runs, "two", case, rank)["task_metrics"] for rank in (0, 1))
    assert one["eval_task_problems"] == rank0["eval_task_problems"] == rank1["eval_task_problems"] == 3
    for metric in ["pass@1", "sampled_pass@1", "pass@2", "maj@2"]:
        key = f"eval_{metric}/__main__:completion_length_score"
        assert rank0[key] == rank1[key] == pytest.approx(one[key], abs=1e-6), key
    assert one["eval_pass@1/__main__:completion_length_score"] > 0.0


def test_token_means_do_not_depend_on_the_micro_batch_split(runs):
    """kl / entropy / clip ratios are token means over the whole logging window (weighted by tokens in log())."""
    one, two = (
        _step_log(_result(runs, "one", "dapo_accumulation")),
        _step_log(_result(runs, "two", "dapo_accumulation")),
    )
    for key in ["kl", "entropy", "clip_ratio/region_mean"]:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


@pytest.mark.parametrize("case", SAVING)
def test_only_rank_zero_saves(runs, case):
    """Each rank got its own output_dir, so whatever rank 1 writes shows up in its folder."""
    one = _files(runs["root"] / "one" / ONE_PROCESS_TWIN.get(case, case) / "rank0")
    rank0, rank1 = (_files(runs["root"] / "two" / case / f"rank{rank}") for rank in (0, 1))
    assert "trainer_state.json" in one and "checkpoint-1/trainer_state.json" in one
    deepspeed_shards = {name for name in rank1 if name.startswith("checkpoint-1/global_step1/")}
    if case in ("grpo", "grpo_lora"):
        assert rank0 == {name.replace("rng_state.pth", "rng_state_0.pth") for name in one}
    else:  # the same final model; the checkpoint holds the engine's own files besides the model
        assert {name for name in one if "/" not in name} == {name for name in rank0 if "/" not in name}
        assert {"checkpoint-1/trainer_state.json", "checkpoint-1/rng_state_0.pth"} <= rank0
    if case.startswith("zero"):  # DeepSpeed checkpoints: every rank writes its own partition of the states
        assert deepspeed_shards and all("_rank_1_" in name for name in deepspeed_shards)
    else:
        assert not deepspeed_shards
    assert rank1 - deepspeed_shards == {"checkpoint-1/rng_state_1.pth"}  # and its RNG state, nothing else
    state = json.loads((runs["root"] / "two" / case / "rank0" / "trainer_state.json").read_text())
    assert len([entry for entry in state["log_history"] if "loss" in entry]) == 1


@pytest.mark.parametrize("case", [case for case in SAVING if case not in ("grpo", "grpo_lora")])
def test_sharded_engines_save_the_whole_trained_model(runs, case):
    """FULL_STATE_DICT (FSDP) and ZeRO-3's gathered 16-bit save write the same weights as the one-process run."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if case.endswith("lora") else "model.safetensors"
    one = load_file(runs["root"] / "one" / ONE_PROCESS_TWIN[case] / "rank0" / name)
    two = load_file(runs["root"] / "two" / case / "rank0" / name)
    assert set(two) == set(one)
    for key, tensor in one.items():
        torch.testing.assert_close(two[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_only_rank_zero_prints_logs(runs):
    # One printed step log per step; the completion samples as often per step as in the one-process run.
    # a resume case: 2 steps straight + 1 step after resuming; an interrupt case: 1 step
    steps = len(COMPARED) + 3 * len(RESUME_CASES) + len(INTERRUPT_CASES)
    assert runs["two"].count("{'loss':") == steps
    assert runs["one"].count("{'loss':") == len(CASES)
    samples_per_step = runs["one"].count("completions:") / len(CASES)
    assert samples_per_step >= 1
    assert runs["two"].count("completions:") == samples_per_step * steps


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resumed_run_ends_where_the_straight_run_ends(runs, case):
    """A new trainer, started from other weights, resumes from the straight run's step-1 checkpoint and runs step 2
    (AdamW, linear schedule): the same weights as two steps straight, so weights, optimizer moments, schedule and
    data order were all restored, by DDP, FSDP2 and DeepSpeed checkpoints alike."""
    for rank in (0, 1):
        result = _result(runs, "two", case, rank)
        assert result["distributed_type"] == _distributed_type(case)
        assert result["steps_run_after_resume"] == 1 and result["global_step"] == 2
        assert result["logged_steps"] == [1, 2]  # the step-1 log came back with the checkpoint
        assert result["same_names"] and result["step_2_update"] > 1e-3
        assert result["max_difference"] < 1e-6


@pytest.mark.parametrize("case", INTERRUPT_CASES)
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(runs, case):
    """SIGTERM reaches rank 1 alone after step 1 of 3: the ranks agree at the step end, both stop after step 1,
    report `interrupted` and leave checkpoint-1 (a rank that went on to step 2 would wait forever for the other)."""
    for rank in (0, 1):
        result = _result(runs, "two", case, rank)
        assert result["distributed_type"] == _distributed_type(case)
        assert result["steps_run"] == result["global_step"] == 1
        assert result["interrupted"] and result["checkpoints"] == ["checkpoint-1"]
    assert runs["two"].count("[grpo-ext] SIGTERM:") == len(INTERRUPT_CASES)  # only rank 1 was signalled


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_recipe_accelerate_configs_load_in_accelerate(name, monkeypatch):
    """Each config goes through what `accelerate launch --config_file` does, down to the plugin it would build."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = ROOT / "recipes" / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert isinstance(config, ClusterConfig) and config.num_processes == 2
    parser = launch_command_parser()
    options = vars(parser.parse_args(["train.py"]))
    for key in [*config.fsdp_config, *config.deepspeed_config]:
        assert key in options, f"{name}.yaml: {key} is not an `accelerate launch` option (typo?)"

    args, defaults, mixed_precision_from_config = _validate_launch_command(
        parser.parse_args(["--config_file", str(path), "train.py"])
    )
    assert args.num_processes == 2 and args.mixed_precision == "bf16"
    for key in list(os.environ):  # the plugins read their settings from the environment
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(key)
    if name == "fsdp":
        assert config.distributed_type == DistributedType.FSDP and args.use_fsdp
        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.auto_wrap_policy is not None and plugin.cpu_ram_efficient_loading
    else:
        assert config.distributed_type == DistributedType.DEEPSPEED and args.use_deepspeed
        fields = [*defaults.deepspeed_config] + ["mixed_precision"] * mixed_precision_from_config
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = DeepSpeedPlugin()
        stage = 2 if name == "deepspeed_zero2" else 3
        assert plugin.zero_stage == stage and plugin.deepspeed_config["zero_optimization"]["stage"] == stage
        assert plugin.zero3_init_flag == (stage == 3)
        if stage == 3:
            assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
