import pytest
from transformers import HfArgumentParser

from grpo_ext import GRPOExtConfig
from grpo_ext.settings import check_settings


def test_defaults_follow_deepseekmath_and_say_where_they_differ_from_trl():
    from trl import GRPOConfig

    ours, trl = GRPOExtConfig(output_dir="x", use_cpu=True), GRPOConfig(output_dir="x", use_cpu=True)
    assert ours.beta == 0.04 and trl.beta == 0.0
    assert ours.loss_type == "grpo" and trl.loss_type == "dapo"
    assert ours.epsilon_high == ours.epsilon == 0.2
    assert "TRL's default is 0.0" in GRPOExtConfig.__dataclass_fields__["beta"].metadata["help"]


def test_docstring_documents_every_field_with_its_help():
    for name in ("num_generations", "beta", "loss_type", "scale_rewards", "logprob_chunk_size"):
        help_text = GRPOExtConfig.__dataclass_fields__[name].metadata["help"]
        assert f"    {name} (*optional*, defaults to" in GRPOExtConfig.__doc__
        assert help_text in GRPOExtConfig.__doc__
    assert "arXiv 2402.03300" in GRPOExtConfig.__doc__


def test_command_line_parsing_and_help(capsys):
    parser = HfArgumentParser(GRPOExtConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--use_cpu",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--loss_type",
            "dapo",
            "--beta",
            "0.0",
            "--scale_rewards",
            "false",
        ]
    )
    assert (args.num_generations, args.loss_type, args.beta, args.scale_rewards) == (4, "dapo", 0.0, "none")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "DeepSeekMath uses 0.04" in capsys.readouterr().out


def test_generation_batch_is_resolved_like_trl():
    args = GRPOExtConfig(
        output_dir="x", use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=4
    )
    assert (args.steps_per_generation, args.generation_batch_size) == (3, 12)  # 4 per step x 3 steps
    args = GRPOExtConfig(
        output_dir="x", use_cpu=True, per_device_train_batch_size=4, generation_batch_size=16, num_generations=8
    )
    assert args.steps_per_generation == 4
    with pytest.raises(ValueError, match="mutually exclusive"):
        GRPOExtConfig(output_dir="x", use_cpu=True, generation_batch_size=16, steps_per_generation=2)


def test_nonfinite_rewards_policy_is_documented_and_checked():
    assert GRPOExtConfig(output_dir="x", use_cpu=True).nonfinite_rewards == "error"
    assert "    nonfinite_rewards (*optional*, defaults to `'error'`):" in GRPOExtConfig.__doc__
    assert "rewards/<name>/nonfinite" in GRPOExtConfig.__dataclass_fields__["nonfinite_rewards"].metadata["help"]
    args = GRPOExtConfig(output_dir="x", use_cpu=True, nonfinite_rewards="skip")  # reward_scoring's rule: at start
    with pytest.raises(ValueError, match=r"nonfinite_rewards='skip' is not one of \('error', 'drop'\)"):
        check_settings(args)


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_about(monkeypatch, tmp_path, fast_bf16):
    import warnings

    from grpo_ext import cpu

    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: fast_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_settings(GRPOExtConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[]))
        check_settings(GRPOExtConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[]))
    slow = [w for w in caught if "without native bf16 support" in str(w.message)]
    assert len(slow) == (0 if fast_bf16 else 1)  # only bf16=True on a CPU without the kernels


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("doctor_patience", 0, r"doctor_patience=0 and doctor_hacking_patience=2 must each be >= 1"),
        ("doctor_hacking_patience", 0, r"doctor_hacking_patience=0 must each be >= 1"),
        ("doctor_zero_std_threshold", 1.5, r"doctor_zero_std_threshold=1.5 must be in \[0, 1\]"),
        ("doctor_clipped_ratio_threshold", -0.1, r"doctor_clipped_ratio_threshold=-0.1 must be in \[0, 1\]"),
        ("doctor_clip_ratio_threshold", 2.0, r"doctor_clip_ratio_threshold=2.0 must be in \[0, 1\]"),
        ("doctor_entropy_drop", 1.5, r"doctor_entropy_drop=1.5 must be in \[0, 1\]"),
        ("doctor_length_fraction", 0.0, r"doctor_length_fraction=0.0 must be in \(0, 1\]"),
        ("doctor_entropy_floor", -1.0, r"doctor_entropy_floor=-1.0 must be >= 0"),
        ("doctor_kl_threshold", 0.0, r"doctor_kl_threshold=0.0 must be > 0"),
        ("doctor_kl_growth", 1.0, r"doctor_kl_growth=1.0 > 1"),
    ],
)
def test_run_doctor_fields_are_documented_and_checked(field, value, message):
    args = GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False)
    assert args.doctor_live is True and (args.doctor_patience, args.doctor_zero_std_threshold) == (5, 0.9)
    assert "    > Run doctor: live diagnosis" in GRPOExtConfig.__doc__
    default = GRPOExtConfig.__dataclass_fields__[field].default
    assert f"    {field} (*optional*, defaults to `{default!r}`):" in GRPOExtConfig.__doc__
    with pytest.raises(ValueError, match=message):
        GRPOExtConfig(output_dir="x", use_cpu=True, bf16=False, **{field: value})


def test_building_a_config_loads_no_module_of_the_trainer_side():
    """The config is a declaration: the rules that need other modules run from `check_settings` at trainer start,
    so building one imports neither the planner, the reward scorer, the model loader, the reference, the tools nor
    the rollout. A fresh interpreter, so that modules other tests imported do not hide an import. (peft itself is
    loaded by transformers' TrainingArguments, before any grpo-ext code runs: building adds none of its modules.)"""
    import pathlib
    import subprocess
    import sys

    heavy = ["plan", "reward_scoring", "models", "reference", "tools", "rollout", "prefix_sharing", "settings", "data"]
    code = (
        "import sys\n"
        "from grpo_ext.config import GRPOExtConfig\n"
        "before = set(sys.modules)\n"
        "GRPOExtConfig(output_dir='x', use_cpu=True, bf16=True, report_to=[], gpu_memory_budget='8GiB',\n"
        "              model_init_kwargs={'dtype': 'bfloat16'}, sync_ref_model=True, do_eval=True,\n"
        "              eval_strategy='steps', eval_steps=1, loss_type='luspo')\n"
        f"print(sorted(m for m in sys.modules if m in {['grpo_ext.' + name for name in heavy]!r}))\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] == 'peft'))\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert run.stdout.split("\n")[:2] == ["[]", "[]"]


def test_pickled_config_leaves_out_what_the_hub_card_leaves_out(tmp_path):
    import pickle

    from grpo_ext.config import is_secret_key

    kwargs = {"dtype": "float32", "token": "hf_x", "api_key": "k", "client_secret": "s"}
    args = GRPOExtConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, hub_token="hf_x", model_init_kwargs=kwargs)
    restored = pickle.loads(pickle.dumps(args))
    assert restored.hub_token is None and restored.model_init_kwargs == {"dtype": "float32"}
    assert [key for key in kwargs if is_secret_key(key)] == ["token", "api_key", "client_secret"]  # one rule
    assert args.model_init_kwargs == kwargs  # the live config keeps them
