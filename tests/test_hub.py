"""Pushing a LoRA adapter: exactly the allowed files, a complete card, no token anywhere, and a repo that reloads.

The network is replaced by an `HfApi` subclass that records `create_repo` / `create_commit` calls; the commit
operations are huggingface_hub's own `CommitOperationAdd`, so what would be uploaded is what is checked.
"""

import json
import logging

import peft
import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, RepoUrl
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import AutoTokenizer

from grpo_ext.hub import (
    CARD_MARKER,
    build_model_card,
    push_adapter_to_hub,
    save_training_config,
    training_config_dict,
)
from grpo_ext.testing import make_tiny_model, make_tokenizer, save_tiny_model

TOKEN = "hf_grpoExtTestToken0123456789abcdef"
BASE_MODEL = "grpo-ext/tiny-qwen2"
REPO_ID = "someone/tiny-grpo-lora"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the uploader only copies the file: a signature is enough here

EXPECTED_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "training_config.json",
    "training_curves.png",
    "README.md",
}


class RecordingHfApi(HfApi):
    """An HfApi that records repository creation and commits instead of calling the Hub."""

    def __init__(self):
        super().__init__(token=False)
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'someone/' + repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, token=None, **kwargs):
        operations = list(operations)
        self.commits.append({"repo_id": repo_id, "operations": operations, "message": commit_message, "token": token})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=commit_message,
            commit_description="",
            oid="0" * 40,
        )

    def uploaded(self) -> dict[str, bytes]:
        """`{path_in_repo: bytes}` of the single recorded commit."""
        assert len(self.commits) == 1
        return {op.path_in_repo: _bytes_of(op) for op in self.commits[0]["operations"]}


def record_hub_apis(monkeypatch, hub_module) -> list[RecordingHfApi]:
    """Replace `hub_module.HfApi` by `RecordingHfApi`; the list fills with every instance the code under test makes."""
    apis = []

    class Api(RecordingHfApi):
        def __init__(self, token=None):
            super().__init__()
            apis.append(self)

    monkeypatch.setattr(hub_module, "HfApi", Api)
    return apis


def _bytes_of(operation: CommitOperationAdd) -> bytes:
    if isinstance(operation.path_or_fileobj, bytes):
        return operation.path_or_fileobj
    with open(operation.path_or_fileobj, "rb") as file:
        return file.read()


def tiny_peft_model(tokenizer):
    """The tiny Qwen2 with a rank-4 LoRA whose B matrices are non-zero, so the adapter changes the logits."""
    model = peft.get_peft_model(
        make_tiny_model(tokenizer=tokenizer, seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL
    return model.eval()


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["12+30=", "7*8=56"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def run_dir(tmp_path, make_args):
    """An output folder as a GRPO run leaves it: adapter, tokenizer, state, config, curves, and files not to push."""
    folder = tmp_path / "run"
    tokenizer = make_tokenizer()
    model = tiny_peft_model(tokenizer)
    model.save_pretrained(folder, save_embedding_layers=False)  # no Hub lookup; also writes PEFT's template README
    tokenizer.save_pretrained(folder)

    args = make_args(output_dir=str(folder), hub_token=TOKEN, model_init_kwargs={"token": TOKEN, "dtype": "float32"})
    save_training_config(args, folder)
    torch.save(args, folder / "training_args.bin")  # pickled, token in clear: must never be pushed
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")  # stray full weights: must never be pushed
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer")
    (folder / "training_curves.png").write_bytes(PNG)
    history = [
        {"step": 1, "reward": 0.1, "rewards/digit_fraction_reward/mean": 0.1, "kl": 0.0, "entropy": 4.4},
        {"step": 2, "reward": 0.25, "rewards/digit_fraction_reward/mean": 0.25, "kl": 0.003, "entropy": 4.3},
        {"step": 2, "train_loss": 0.01, "train_runtime": 1.5},
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": history}))
    return folder, model, tokenizer


def test_push_uploads_exactly_the_adapter_files(run_dir):
    folder, _, _ = run_dir
    api = RecordingHfApi()

    commit = push_adapter_to_hub(folder, REPO_ID, token=TOKEN, private=True, commit_message="GRPO run", api=api)

    assert api.repos == [{"repo_id": REPO_ID, "token": TOKEN, "private": True, "exist_ok": True}]
    [call] = api.commits
    assert (call["repo_id"], call["message"], call["token"]) == (REPO_ID, "GRPO run", TOKEN)
    assert all(isinstance(op, CommitOperationAdd) for op in call["operations"])
    uploaded = api.uploaded()
    assert set(uploaded) == EXPECTED_FILES  # no model.safetensors, training_args.bin, trainer_state, checkpoints
    for name in EXPECTED_FILES - {"README.md"}:
        assert uploaded[name] == (folder / name).read_bytes(), name
    assert isinstance(commit, CommitInfo) and commit.oid == "0" * 40


def test_repo_id_without_namespace_is_resolved_by_create_repo(run_dir):
    folder, _, _ = run_dir
    api = RecordingHfApi()
    push_adapter_to_hub(folder, "tiny-grpo-lora", api=api)
    assert api.commits[0]["repo_id"] == REPO_ID
    assert f'from_pretrained("{REPO_ID}")' in api.uploaded()["README.md"].decode()  # the card says how to load it


def test_card_describes_the_run(run_dir):
    folder, _, _ = run_dir
    api = RecordingHfApi()
    push_adapter_to_hub(folder, REPO_ID, api=api)
    text = api.uploaded()["README.md"].decode()

    card = ModelCard(text)  # the YAML front matter parses as Hub metadata
    assert card.data.base_model == BASE_MODEL
    assert card.data.library_name == "peft"
    assert card.data.tags == ["grpo", "grpo-ext", "trl", "peft", "lora"]
    assert CARD_MARKER in text and "Model Card for Model ID" not in text  # ours, not PEFT's template
    assert "- **Reward functions:** `digit_fraction_reward`" in text
    assert "| `learning_rate` | 0.001 |" in text
    assert "| `num_generations` | 4 |" in text
    assert "| `max_completion_length` | 6 |" in text
    assert "| `lora_r` | 4 |" in text
    assert "| `lora_target_modules` | q_proj, v_proj |" in text
    assert "| `reward` | 0.25 |" in text and "| `global_step` | 2 |" in text
    assert "![Training curves](training_curves.png)" in text
    assert f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{BASE_MODEL}"), "{REPO_ID}")' in text
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO_ID}")' in text
    assert "@article{shao2024deepseekmath" in text and "arXiv:2402.03300" in text
    assert "@misc{vonwerra2020trl" in text and "{{TRL: Transformer Reinforcement Learning}}" in text
    assert "von Werra" in text and "https://github.com/huggingface/trl" in text and "year         = 2020" in text


def test_build_model_card_with_datasets_and_for_a_full_model():
    card = build_model_card(
        "Qwen/Qwen2.5-Math-1.5B",
        "openai/gsm8k",
        ["accuracy", "format"],
        {"beta": 0.04, "hub_token": TOKEN, "reward_weights": [1.0, 0.5], "note": "a|b"},
        {},
        None,
        REPO_ID,
    )
    data = ModelCard(card).data
    assert data.datasets == ["openai/gsm8k"] and data.base_model == "Qwen/Qwen2.5-Math-1.5B"
    assert "`accuracy`, `format`" in card and "| `reward_weights` | 1, 0.5 |" in card and "a\\|b" in card
    assert TOKEN not in card and "hub_token" not in card
    assert "Final metrics" not in card and "Training curves" not in card  # sections without content are left out

    full = build_model_card("/local/checkpoints/base", None, None, {}, {}, None, REPO_ID, adapter=False)
    data = ModelCard(full).data
    assert data.base_model is None  # a local path is not Hub metadata
    assert data.library_name == "transformers" and "peft" not in data.tags
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in full and "PeftModel" not in full


def test_token_appears_in_no_uploaded_file_nor_log(run_dir, caplog):
    folder, _, _ = run_dir
    api = RecordingHfApi()
    with caplog.at_level(logging.DEBUG):
        push_adapter_to_hub(folder, REPO_ID, token=TOKEN, api=api)

    for name, data in api.uploaded().items():
        assert TOKEN.encode() not in data, name
    assert TOKEN not in caplog.text and "training_config.json" in caplog.text
    config = json.loads((folder / "training_config.json").read_text())
    assert not [key for key in config if "token" in key.lower()]
    assert config["model_init_kwargs"] == {"dtype": "float32"}  # nested `token` dropped, the rest kept
    assert config["learning_rate"] == 0.001 and config["num_generations"] == 4


def test_a_file_holding_the_token_stops_the_push(run_dir):
    folder, _, _ = run_dir
    (folder / "vocab.txt").write_text(f"a\nb\n{TOKEN}\n")  # an allowed file name, leaked content
    api = RecordingHfApi()
    with pytest.raises(ValueError, match=r"\['vocab.txt'\] contain the Hub token") as error:
        push_adapter_to_hub(folder, REPO_ID, token=TOKEN, api=api)
    assert TOKEN not in str(error.value)
    assert api.commits == []


def test_token_copied_into_another_field_is_redacted(make_args, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = make_args(hub_token=TOKEN, run_name=TOKEN)
    config = training_config_dict(args)
    assert config["run_name"] == "<redacted>" and "hub_token" not in config
    assert TOKEN not in json.dumps(config)


def test_pushed_files_reload_to_the_same_model(run_dir, tmp_path):
    """Materialise the commit as the Hub would serve it, then load it on a fresh copy of the base model."""
    folder, original, tokenizer = run_dir
    api = RecordingHfApi()
    push_adapter_to_hub(folder, REPO_ID, api=api)
    hub = tmp_path / "hub"
    hub.mkdir()
    for name, data in api.uploaded().items():
        (hub / name).write_bytes(data)

    reloaded = PeftModel.from_pretrained(make_tiny_model(tokenizer=make_tokenizer(), seed=0), hub).eval()
    hub_tokenizer = AutoTokenizer.from_pretrained(hub)

    expected = logits(original, tokenizer)
    assert torch.equal(logits(reloaded, hub_tokenizer), expected)
    assert not torch.equal(logits(make_tiny_model(tokenizer=tokenizer, seed=0).eval(), tokenizer), expected)
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_model(seed=0), folder).eval(), tokenizer), expected)


def test_full_model_is_refused_with_instructions(tmp_path):
    full = save_tiny_model(tmp_path / "full")
    api = RecordingHfApi()
    with pytest.raises(ValueError, match="holds full model weights, not a LoRA adapter") as error:
        push_adapter_to_hub(full, REPO_ID, api=api)
    assert "model.push_to_hub(repo_id)" in str(error.value)
    assert "upload_folder" not in str(error.value)  # never advise uploading a folder holding run files
    assert api.repos == [] and api.commits == []  # refused before anything reaches the Hub

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        push_adapter_to_hub(tmp_path / "empty", REPO_ID, api=api)


def test_card_choice_given_then_ours_in_folder_then_built(run_dir):
    folder, _, _ = run_dir
    api = RecordingHfApi()
    push_adapter_to_hub(folder, REPO_ID, api=api, model_card="# given\n")
    assert api.uploaded()["README.md"] == b"# given\n"

    ours = build_model_card(BASE_MODEL, "my/data", ["accuracy"], {}, {}, None, REPO_ID)
    (folder / "README.md").write_text(ours)
    api = RecordingHfApi()
    push_adapter_to_hub(folder, REPO_ID, api=api)
    assert api.uploaded()["README.md"].decode() == ours  # written by the trainer: kept as is


def test_trainer_push_to_hub_uploads_the_adapter_and_card_only(tmp_path, monkeypatch):
    """GRPOExtTrainer.push_to_hub (and checkpoint pushes) go through push_adapter_to_hub: no base weights, no token."""
    import grpo_ext.hub as hub
    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset, save_tiny_model

    apis = record_hub_apis(monkeypatch, hub)
    secret = "hf_NOTAREALTOKEN0123456789"
    args = GRPOExtConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
        max_steps=1, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, hub_token=secret, hub_model_id="someone/tiny-grpo",
    )  # fmt: skip
    trainer = GRPOExtTrainer(
        save_tiny_model(tmp_path / "base"), digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )  # fmt: skip
    trainer.train()
    trainer.push_to_hub(dataset_name="synthetic/sums")
    uploaded = apis[-1].uploaded()
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "training_config.json"} <= set(uploaded)
    assert not any(name.endswith((".bin", "model.safetensors")) and "adapter" not in name for name in uploaded)
    assert not any(secret.encode() in data for data in uploaded.values())
    card = uploaded["README.md"].decode()
    assert "digit_fraction_reward" in card and "synthetic/sums" in card and "PeftModel" in card


def test_completions_tables_are_uploaded_to_a_hub_dataset(tmp_path, monkeypatch):
    """log_completions_hub_repo: a dataset repository with a card, then each logging step's parquet file, uploaded
    with the run's token; what is uploaded is the table the run wrote."""
    import pandas as pd

    import grpo_ext.hub as hub
    from grpo_ext import GRPOExtConfig, GRPOExtTrainer
    from grpo_ext.testing import digit_fraction_reward, make_prompt_dataset

    apis = record_hub_apis(monkeypatch, hub)
    secret = "hf_NOTAREALTOKEN0123456789"
    args = GRPOExtConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
        max_steps=1, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, logging_steps=1, log_completions=True, log_completions_hub_repo="someone/grpo-completions",
        hub_token=secret, hub_private_repo=True, hub_model_id="someone/tiny-grpo",
    )  # fmt: skip
    trainer = GRPOExtTrainer(
        make_tiny_model("qwen2"), digit_fraction_reward, args=args, train_dataset=make_prompt_dataset(8),
        processing_class=make_tokenizer(),
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        trainer._completions_uploads.stop()
    (api,) = apis
    repo = {"repo_id": "someone/grpo-completions", "repo_type": "dataset", "private": True, "token": secret}
    assert [{key: r.get(key) for key in repo} for r in api.repos][0] == repo
    assert all(commit["repo_id"] == "someone/grpo-completions" for commit in api.commits)
    uploaded = {}
    for commit in api.commits:
        for operation in commit["operations"]:
            with operation.as_file() as file:
                uploaded[operation.path_in_repo] = file.read()
    assert set(uploaded) == {"README.md", "completions_00001.parquet"}
    card = uploaded["README.md"].decode()
    assert 'load_dataset("someone/grpo-completions")' in card and "huggingface.co/someone/tiny-grpo" in card
    local = tmp_path / "out" / "completions" / "completions_00001.parquet"
    assert uploaded["completions_00001.parquet"] == local.read_bytes()
    table = pd.read_parquet(local)
    assert list(table.columns) == ["step", "prompt", "completion", "digit_fraction_reward", "reward", "advantage"]
    assert len(table) == 8 and (table["step"] == 0).all()
