"""GRPOExtConfig: every knob of a GRPO run, on TRL's config base class.

Fields shared with `trl.GRPOConfig` keep its names and meaning, so a TRL user's YAML keeps working. Each field's help
text is written once, in `metadata["help"]`; the class docstring is built from those texts (see `_document`), so
`help(GRPOExtConfig)` and `--help` always say the same thing.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl.trainer.base_config import _BaseConfig

# A config checks each field against itself (and the other fields) when it is built. A rule that needs another module's
# knowledge (its table of loss types, reference modes, memory sizes, ...) lives in that module, beside the table, and
# runs at trainer start from `settings.check_settings`: building a config, a `--help` or the planner import none of
# them.
if typing.TYPE_CHECKING:
    from .objective import SurrogateParams

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Loss types whose clipping settings are meant to be far from the defaults (PPO's 0.2): field -> (recommended value,
# where it comes from, what the default does instead). A field left at its default with such a loss type is warned
# about at config time; a value set explicitly, even the default's, is taken as meant.
RECOMMENDED_CLIPPING: dict[str, dict[str, tuple[float, str, str]]] = {
    "cispo": {
        "epsilon_high": (
            5.0,
            "the ScaleRL paper's epsilon_max for CISPO (arXiv 2510.13786), the value TRL's GRPOConfig recommends",
            "CISPO's token weight is min(ratio, epsilon_high) and the ratio starts near 1, so the default (epsilon_high "
            "= epsilon = 0.2) caps every token's weight at 0.2 and shrinks the whole gradient about 5x instead of "
            "capping only the outliers",
        ),
    },
}
SCALE_REWARDS = ("group", "batch", "none")


def is_secret_key(key) -> bool:
    """Field names that may hold a credential: `hub_token`, `token`, ... (every name containing "token"), secrets.
    The one rule for what stays out of the model card's config and of a pickled `GRPOExtConfig`."""
    return any(word in str(key).lower() for word in ("token", "secret", "password", "api_key"))


def _field(default: Any, help: str, **kwargs):
    metadata = {"help": help}  # HfArgumentParser hands metadata to argparse: only argparse keywords belong here
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


# Every `trl.GRPOConfig` field grpo-ext does not implement: field -> why, and what to use instead. GRPOExtConfig has
# each of them with TRL's type and default, so a TRL config that leaves them alone loads; any other value is an error
# naming the field (`_refuse_unsupported_trl_fields`). tests/test_trl_contract.py checks that every TRL field is either
# implemented with TRL's meaning or listed here.
_VLLM = (
    "vLLM is not supported: grpo-ext generates with transformers' `generate` on the (4-bit) policy itself, each "
    "prompt prefilled once per group (`prefix_sharing`). Leave the vLLM fields at their defaults; pass generation "
    "options through `generation_kwargs`."
)
REFUSED_TRL_FIELDS: dict[str, str] = {
    "use_vllm": _VLLM,
    "vllm_mode": _VLLM,
    "vllm_model_impl": _VLLM,
    "vllm_enable_sleep_mode": _VLLM,
    "vllm_structured_outputs_regex": _VLLM,
    "vllm_server_base_url": _VLLM,
    "vllm_server_host": _VLLM,
    "vllm_server_port": _VLLM,
    "vllm_server_timeout": _VLLM,
    "vllm_group_port": _VLLM,
    "vllm_gpu_memory_utilization": _VLLM,
    "vllm_max_model_length": _VLLM,
    "vllm_tensor_parallel_size": _VLLM,
    "vllm_importance_sampling_correction": _VLLM + " Without vLLM there is no sampler mismatch to correct.",
    "vllm_importance_sampling_mode": _VLLM + " Without vLLM there is no sampler mismatch to correct.",
    "vllm_importance_sampling_clip_max": _VLLM + " Without vLLM there is no sampler mismatch to correct.",
    "vllm_importance_sampling_clip_min": _VLLM + " Without vLLM there is no sampler mismatch to correct.",
    "vllm_importance_sampling_cap": _VLLM + " (Deprecated in TRL too.)",
    "use_liger_kernel": "Liger kernels are not supported: grpo-ext never materialises the (B, T, V) logits anyway "
    "(log-probs are computed `logprob_chunk_size` tokens at a time); lower `logprob_chunk_size` to save memory.",
}
# `trl.GRPOConfig` fields grpo-ext implements with another default, and why (README, "Drop-in for TRL").
DEFAULTS_DIFFERING_FROM_TRL: dict[str, str] = {
    "beta": "0.04, DeepSeekMath's KL coefficient (TRL 0.0: no KL term)",
    "loss_type": "`grpo`, DeepSeekMath's objective (TRL `dapo`)",
    "use_bias_correction_kl": "False, DeepSeekMath's plain k3 term (TRL True)",
    "num_completions_to_print": "4 (TRL None: all)",
}


def _trl_field_defaults() -> dict[str, Any]:
    from trl.trainer.grpo_config import GRPOConfig

    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(GRPOConfig)
    }


def _refused_fields_base():
    """A `_BaseConfig` subclass holding the refused TRL fields that `_BaseConfig` lacks, each with TRL's type and
    default and its reason as help (the class `GRPOExtConfig` derives from)."""
    from trl.trainer.grpo_config import GRPOConfig

    trl_fields, trl_defaults = {f.name: f for f in dataclasses.fields(GRPOConfig)}, _trl_field_defaults()
    inherited = {f.name for f in dataclasses.fields(_BaseConfig)}
    specs = []
    for name, reason in REFUSED_TRL_FIELDS.items():
        if name in inherited or name not in trl_fields:  # a name TRL dropped: the contract test reports it
            continue
        trl_field = trl_fields[name]
        help_text = f"TRL field, not supported: only its default is accepted. {reason}"
        specs.append((name, trl_field.type, _field(trl_defaults[name], help_text)))
    cls = dataclasses.make_dataclass("_RefusedTRLFields", specs, bases=(_BaseConfig,))
    cls.__module__ = __name__
    return cls


_RefusedTRLFields = _refused_fields_base()


@dataclass
class GRPOExtConfig(_RefusedTRLFields):
    # --- Defaults overridden from TrainingArguments / _BaseConfig ---
    learning_rate: float = _field(
        1e-6,
        "Initial learning rate for AdamW. DeepSeekMath uses 1e-6 for full fine-tuning; LoRA adapters usually want "
        "10-100x more (1e-5 to 1e-4). Same default as TRL.",
    )
    remove_unused_columns: bool | None = _field(
        False,
        "Whether to drop dataset columns other than `prompt`. Keep `False` (the default, as in TRL) so reward "
        "functions receive the other columns (e.g. `answer`) as keyword arguments.",
    )

    # --- Model ---
    model_init_kwargs: dict[str, Any] | str | None = _field(
        None,
        "Keyword arguments for `AutoModelForCausalLM.from_pretrained`, used when `model` is given as a string (e.g. "
        '`{"dtype": "bfloat16"}`). As in TRL, `dtype` is a `torch.dtype` or one of `"bfloat16"`, `"float16"`, '
        '`"float32"`, `"auto"` (the checkpoint\'s own dtype), and defaults to `float32` when not set; any other value '
        "is an error.",
    )
    trust_remote_code: bool = _field(
        False,
        "Allow loading models and tokenizers that ship their own Python code from the Hub (policy, tokenizer, reward "
        "models, reference copy): added to `model_init_kwargs` as `trust_remote_code=True`. Same as TRL.",
    )
    disable_dropout: bool = _field(
        False,
        "Whether to set every dropout probability of the policy to 0, so the policy, old and reference passes see "
        "the same function. Recommended `True` when the base model has dropout.",
    )
    lora_vision_tower: bool = _field(
        False,
        "With a vision-language model and a PEFT adapter (`peft_config`): whether LoRA also adapts the linear layers "
        "of the vision tower and projector (Qwen2.5-VL's `model.visual`, its merger inside). By default the adapter "
        "sits on the language model only, whatever `target_modules` says, and the vision side stays frozen, as in "
        "the QLoRA recipes for vision-language models (a 4-bit load keeps it out of quantization too, in the "
        "loading dtype). `True` adapts both; the reference (disabled adapter) is the base model either way. Not in "
        "TRL, whose adapter follows `target_modules` alone.",
    )
    cast_lm_head_to_fp32: bool = _field(
        False,
        "Cast the LM head of the policy (and of a reference copy) to float32 and run its projection in float32, "
        "outside autocast, for log-probs and generation alike, as the ScaleRL recipe recommends "
        "(arXiv 2510.13786). With tied embeddings the shared weight becomes float32 and the embedding output keeps "
        "the model's dtype, as in TRL. Not supported when a PEFT adapter targets `lm_head`. Same as TRL.",
    )

    # --- Data and generation ---
    num_generations: int = _field(
        8,
        "G in DeepSeekMath (arXiv 2402.03300): completions sampled per prompt. Must be >= 2. DeepSeekMath uses 64; "
        "8 to 16 fits a consumer GPU. The generation batch must be divisible by it.",
    )
    num_generations_eval: int | None = _field(
        None,
        "Completions sampled per prompt during evaluation (the eval rollout's group size, for its advantages and "
        "metrics); fewer than `num_generations` makes evaluation cheaper. None uses `num_generations`. The global eval "
        "batch (`per_device_eval_batch_size` x processes) must be divisible by it. Same as TRL.",
    )
    max_completion_length: int = _field(
        512,
        "Maximum number of tokens generated per completion. Same default as TRL.",
    )
    max_prompt_length: int | None = _field(
        None,
        "Maximum prompt length in tokens. None (the default): every prompt is checked at start, and one longer than "
        "the model's max_position_embeddings minus max_completion_length is an error naming its row. An int: longer "
        "prompts are cut from the left to this many tokens at rollout (as TRL's former `max_prompt_length`; reward "
        "functions still get the whole prompt), and it must fit with max_completion_length in the model's positions.",
    )
    shuffle_dataset: bool = _field(
        True,
        "Whether to shuffle the training prompts.",
    )
    pad_to_multiple_of: int | str | None = _field(
        "auto",
        "Pad the prompt ids (on the left) and the completion ids (on the right) of each rollout, and of each "
        "micro-batch cut from it, to a multiple of this many tokens, as TRL does: fewer distinct shapes for compilers "
        "that build one graph per input shape. The padding is masked, so log-probs and the loss are unchanged. "
        "`auto` (the default, as TRL): 128 on Neuron (AWS Trainium), no padding elsewhere; None: no padding.",
    )
    generation_batch_size: int | None = _field(
        None,
        "Completions generated per rollout, across all processes. Defaults to `per_device_train_batch_size x "
        "num_processes x steps_per_generation` (one rollout per optimizer step). Mutually exclusive with "
        "`steps_per_generation`.",
    )
    steps_per_generation: int | None = _field(
        None,
        "Micro-steps served by one rollout. Defaults to `gradient_accumulation_steps`. Mutually exclusive with "
        "`generation_batch_size`.",
    )
    temperature: float = _field(
        1.0,
        "Sampling temperature; > 0. DeepSeekMath samples at 1.0.",
    )
    top_p: float = _field(
        1.0,
        "Nucleus sampling threshold in (0, 1]; 1.0 keeps all tokens.",
    )
    top_k: int = _field(
        0,
        "Top-k filtering; 0 disables it.",
    )
    min_p: float | None = _field(
        None,
        "Minimum token probability relative to the most likely token, in [0, 1]; typical 0.01-0.2.",
    )
    repetition_penalty: float = _field(
        1.0,
        "Penalty (> 0) on tokens already in the prompt or completion; 1.0 disables it.",
    )
    generation_kwargs: dict[str, Any] | str | None = _field(
        None,
        "Extra `transformers.GenerationConfig` arguments; they override the fields above. Refused: "
        "`num_return_sequences` (the trainer repeats each prompt `num_generations` times) and a `temperature` other "
        "than the field's (scoring divides the logits by the field's). Greedy decoding (`do_sample=False`) is warned "
        "about: a group's completions are then identical and nothing is learned.",
    )
    chat_template_kwargs: dict[str, Any] | str | None = _field(
        None,
        "Extra arguments for `apply_chat_template` on conversational prompts.",
    )
    dynamic_sampling: bool = _field(
        False,
        "DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): drop groups whose G rewards are all equal (no "
        "policy gradient) and roll out more prompts until the batch is full of groups that vary, or "
        "`max_sampling_rounds` is reached; then the batch is topped up with dropped groups (zero advantage) and "
        "trained. Logs `sampling/rounds` and `sampling/kept_groups_ratio`. Worth it when `frac_reward_zero_std` is "
        "high. Groups must not span processes (per_device_train_batch_size x steps_per_generation a multiple of G).",
    )
    max_sampling_rounds: int = _field(3, "Most rollouts per batch with `dynamic_sampling` (the first included).")
    prefix_sharing: bool = _field(
        True,
        "Encode each prompt once per group instead of G times: rollouts prefill each unique prompt once and share its "
        "KV cache, and the old / reference / policy log-prob passes run the completions against the prompt's shared "
        "keys and values. Same greedy completions, log-probs and gradients up to float rounding. Falls back to the "
        "plain path, with one warning, where it cannot share (see grpo_ext/prefix_sharing.py); off under DeepSpeed "
        "and FSDP. Largest gain with long prompts. Not in TRL.",
    )
    drop_finished_rows: bool = _field(
        True,
        "Drop a completion from the decoding batch, and its rows from the KV cache, as soon as it emits a stop token "
        "(grpo_ext/decoding.py), instead of decoding every row until the longest one stops as `model.generate` does. "
        "The same sampling distribution (the same logits processors as `generate`), identical greedy completions; "
        "fewer tokens decoded when completion lengths are uneven. Falls back to `generate`, with one warning, for "
        "settings it does not reproduce (beam search, stop strings, non-dynamic caches); off under DeepSpeed and "
        "FSDP, whose ranks must run the same number of forward passes. Not in TRL.",
    )
    speculative_draft_tokens: int = _field(
        0,
        "Speculative decoding with drafts from the group (grpo_ext/speculative.py): each decoding forward also "
        "verifies up to this many tokens per row that n-gram lookup proposes from the prompt, the other completions "
        "of the group so far and earlier rollouts' completions of the prompt (grpo_ext/drafting.py). Exact: "
        "identical greedy completions, the same sampling distribution. It saves decoding forwards and costs a forward "
        "over k + 1 positions: on a GPU (decoding reads the weights once per forward) 4 to 8 is the usual choice; on "
        "a CPU it did not pay in this project's measurements (benchmarks/README.md). 0 (the default) turns it off. "
        "Needs `drop_finished_rows`, full-attention layers and eager / SDPA attention (else one warning and plain "
        "decoding). Logs `speculative/acceptance_rate` and `speculative/tokens_per_forward`. Not in TRL.",
    )
    speculative_ngram_size: int = _field(
        3, "Longest n-gram matched to find a draft (then shorter ones, down to one token); 3 is a good default."
    )
    speculative_memory_prompts: int = _field(
        4096,
        "Earlier rollouts' completions of a prompt are drafts for the same prompt in a later epoch: the last G "
        "completions of at most this many prompts are kept (in CPU memory, least recently used dropped). 0: none.",
    )
    cache_implementation: str | None = _field(
        None,
        "KV-cache implementation for generation, as `GenerationConfig.cache_implementation` (e.g. `static`). None "
        "(the default): a dynamic cache, which lets generation drop finished rows and prefill each prompt once per "
        "group. `static` preallocates the cache, and on CUDA `generate` then compiles its decoding step (not with a "
        "4-bit bitsandbytes model, which is not compileable): it can pay off for long fixed-length completions on a "
        "GPU; on a CPU it measured slower (benchmarks/README.md). With a non-dynamic cache generation runs through "
        "`model.generate` on every row (one warning), while scoring still encodes each prompt once. Same as TRL.",
    )
    use_transformers_continuous_batching: bool = _field(
        False,
        "Generate with transformers' continuous batching engine (`model.generate_batch`: paged attention, requests "
        "scheduled as they finish), as TRL does. It replaces grpo-ext's own decoding (no shared prefill, no dropped "
        "rows; scoring still encodes each prompt once) and does not apply every `generate` setting (e.g. "
        "`min_new_tokens`). Built for serving on a GPU; on a CPU it measured 3.8x slower than `generate` "
        "(benchmarks/README.md). Recommended False. Same as TRL.",
    )
    transformers_continuous_batching_config: dict[str, Any] | str | None = _field(
        None,
        "Keyword arguments for `transformers.generation.ContinuousBatchingConfig`. As in TRL, `max_memory_percent` "
        "defaults to 0.5 instead of transformers' 0.9, leaving memory for the backward pass.",
    )
    use_transformers_paged: bool = _field(
        False,
        "Deprecated in TRL (1.2): sets `use_transformers_continuous_batching=True`, with a FutureWarning.",
    )
    ds3_gather_for_generation: bool = _field(
        True,
        "DeepSpeed ZeRO-3 only (as in TRL): gather the whole policy on each GPU for generation, which is fast but needs "
        "the unsharded weights in memory for a moment. False generates with the weights left partitioned (each layer "
        "gathered as it runs): slower, but trains models that do not fit one GPU.",
    )
    max_tool_calling_iterations: int | None = _field(
        None,
        "Maximum number of tool-calling rounds per completion when the trainer has `tools` or an "
        "`environment_factory` (an agent): after each round the tool results are appended and the model generates its "
        "next turn. None (TRL's default): no limit; a completion stops when a turn calls no tool or when tool results "
        "would push it past max_completion_length (then they are dropped, counted as failed calls and in "
        "`tools/truncated_frequency`, and warned about once). Tool-result tokens count toward "
        "max_completion_length but are not scored. Set it (e.g. 2-5) to bound a rollout's cost.",
    )
    tool_timeout: float | None = _field(
        60.0,
        "Seconds a tool call (a function of `tools`, or an environment's method) may run before it is abandoned: the "
        "model then gets an error result, counted in `tools/failure_frequency` and `tools/timeout_frequency`, and the "
        "rollout goes on. 60 (the default) leaves room for slow tools while a tool that hangs costs a minute, not the "
        "run. None: no limit. A sync tool cannot be killed in Python: it runs in a worker thread that is left running "
        "when the deadline passes (code that needs the main thread, such as `signal.alarm`, fails there: use None "
        "for it); an async tool is cancelled. Not in TRL (which waits forever).",
    )
    environment_reset_timeout: float | None = _field(
        300.0,
        "Seconds an environment's `reset(**row)` may run (with `environment_factory`) before the step stops with an "
        "error naming the environment and the row, instead of hanging. 300 (the default) allows for starting a "
        "sandbox or container. None: no limit. With a limit, `reset` runs in a worker thread, abandoned when the "
        "deadline passes. Not in TRL.",
    )

    # --- Objective ---
    beta: float = _field(
        0.04,
        "Coefficient of the KL(pi_theta || pi_ref) term in the loss (k3 estimator). DeepSeekMath uses 0.04, which is "
        "this default; TRL's default is 0.0. With 0.0 no reference pass is run and no reference model is held.",
    )
    router_aux_loss_coef: float | None = _field(
        None,
        "Weight of the load-balancing loss of Mixture-of-Experts models (Switch Transformer, arXiv 2101.03961, eqs. "
        "4-6, computed by the model's own `load_balancing_loss_func` from the router logits of the policy's scoring "
        "pass), added to the GRPO loss and logged as `aux_loss`. None (the default, as TRL): the coefficient the "
        "model config declares (`router_aux_loss_coef`, e.g. 0.001 for Qwen3-MoE); 0.0 turns it off. A non-zero value "
        "for a dense model is an error. Same as TRL.",
    )
    num_iterations: int = _field(
        1,
        "mu in DeepSeekMath's Algorithm 1: optimisation passes over each rollout. DeepSeekMath uses 1.",
    )
    epsilon: float = _field(
        0.2,
        "Lower clipping range: the ratio is clipped at 1 - epsilon. PPO/DeepSeekMath use 0.2.",
    )
    epsilon_high: float | None = _field(
        None,
        "Upper clipping range: the ratio is clipped at 1 + epsilon_high. Defaults to `epsilon`. DAPO "
        "(arXiv 2503.14476) recommends 0.28 ('clip-higher'). With `loss_type='cispo'` it is the cap of the token "
        "weight itself (epsilon_max), for which ScaleRL (arXiv 2510.13786) and TRL recommend 5.0; left unset with "
        "cispo, a warning says so.",
    )
    delta: float | None = _field(
        None,
        "Two-sided clipping (INTELLECT-2, arXiv 2505.07291): the ratio of the unclipped term is also capped at delta, "
        "so a token with a negative advantage and a huge ratio cannot blow up the loss. None (the default) keeps "
        "PPO's one-sided clip. Must be > 1 + epsilon_high when set; clipped loss types only (`grpo`, `dapo`, "
        "`dr_grpo`, `bnpo`, `luspo`).",
    )
    sapo_temperature_neg: float = _field(
        1.05, "tau for tokens with a non-positive advantage in the `sapo` gate (arXiv 2511.20347); > 0."
    )
    sapo_temperature_pos: float = _field(
        1.0, "tau for tokens with a positive advantage in the `sapo` gate (arXiv 2511.20347); > 0."
    )
    vespo_k_pos: float = _field(
        2.0,
        "k of VESPO's weight phi(w) = exp(lambda + k log w - lambda w) for A >= 0 (arXiv 2602.10693): how strongly "
        "sequences with w < 1 are down-weighted.",
    )
    vespo_lambda_pos: float = _field(
        3.0, "lambda of VESPO's weight for A >= 0: how strongly sequences with w > 1 are down-weighted."
    )
    vespo_k_neg: float = _field(3.0, "k of VESPO's weight for A < 0.")
    vespo_lambda_neg: float = _field(2.0, "lambda of VESPO's weight for A < 0.")
    importance_sampling_level: str = _field(
        "token",
        "`token`: one ratio per token (GRPO). `sequence`: GSPO's length-normalised sequence ratio "
        "exp(mean_t log rho_t) shared by the sequence's tokens (arXiv 2507.18071).",
    )
    loss_type: str = _field(
        "grpo",
        "How token losses are averaged. `grpo`: 1/G sum_i 1/|o_i| sum_t, DeepSeekMath's objective (the default; TRL's "
        "default is `dapo`). `dapo`: sum over all tokens / number of tokens in the whole batch across processes "
        "(arXiv 2503.14476). `dr_grpo`: sum / (num completions x max_completion_length), no length bias "
        "(arXiv 2503.20783). `bnpo`: token mean over this process's batch; TRL takes it per micro-batch, this "
        "project over the whole accumulation window so gradient accumulation does not change it (equal when "
        "gradient_accumulation_steps=1). `luspo`: 1/N sum_i sum_t, GSPO's sequence loss scaled by the sequence's "
        "length (arXiv 2602.05261; use it with importance_sampling_level='sequence'). Three replace the clipped "
        "surrogate: `cispo` (MiniMax-M1, arXiv 2506.13585): -sg(min(rho, epsilon_high)) A log pi, the weight capped "
        "at `epsilon_high` (ScaleRL recommends 5.0) and detached, averaged as `dapo`; `sapo` (arXiv 2511.20347): a "
        "smooth gate -4/tau sigmoid(tau (rho - 1)) A with `sapo_temperature_pos` / `sapo_temperature_neg`, averaged "
        "as `grpo`; `vespo` (arXiv 2602.10693): -sg(phi(w)) A log pi, phi a Gamma-shaped weight of the sequence ratio "
        "w (`vespo_*`), averaged as `dapo`.",
    )
    scale_rewards: str = _field(
        "group",
        "Divisor of the advantages: `group` std (DeepSeekMath), `batch` std (arXiv 2508.08221) or `none` "
        "(Dr. GRPO, arXiv 2503.20783). `True`/`False` are read as `group`/`none`, as in TRL.",
    )
    reward_weights: list[float] | None = _field(
        None,
        "Weight of each reward function in the summed reward, in the order given; defaults to 1.0 each.",
    )
    multi_objective_aggregation: str = _field(
        "sum_then_normalize",
        "How several reward functions make one advantage. `sum_then_normalize` (the default): the weighted sum of the "
        "rewards, then the group normalisation of `scale_rewards`. `normalize_then_sum`: GDPO (arXiv 2601.05242), each "
        "function's rewards normalised within their group first, (r_ik - mean_group) / (std_group + 1e-4), then the "
        "weighted sum, then normalised over the whole batch (`scale_rewards` does not apply), so a function with a "
        "large spread does not drown the others. Reward-side penalties are subtracted from the aggregated reward "
        "before its normalisation. Same as TRL.",
    )
    nonfinite_rewards: str = _field(
        "error",
        "What to do when a reward function returns NaN or +/-inf (not None) for a completion. `error` (the default): "
        "stop at that step with an error naming the function, the row and the count, since one such value turns the "
        "advantages and then every weight into NaN. `drop`: leave the value out of that function's reward, as if the "
        "function had returned None (the weighted sum skips it), and log the count as `rewards/<name>/nonfinite`. "
        "Not in TRL.",
    )
    reward_timeout: float | None = _field(
        600.0,
        "Seconds a reward function (sync or async, an environment's `get_reward` included; not a reward model) may "
        "take on one batch before the step stops with an error naming it, instead of hanging. 600 (the default) "
        "leaves room for an API judge over a large batch. None: no limit, and sync functions run on the calling "
        "thread. With a limit a sync function runs in a worker thread (it cannot be killed: it is abandoned when the "
        "deadline passes; code that needs the main thread, such as `signal.alarm`, fails there: use None for it); an "
        "async one is cancelled. Not in TRL (which waits forever).",
    )
    mask_truncated_completions: bool = _field(
        False,
        "Exclude completions cut at max_completion_length (no EOS) from the loss. DAPO recommends it.",
    )

    kl_estimator: str = _field(
        "k3",
        "Estimator of KL(pi_theta || pi_ref) in the loss term weighted by `beta`: `k3` (DeepSeekMath eq. 4, unbiased, "
        ">= 0; recommended), `k1` (log-ratio) or `k2` (squared log-ratio / 2). See http://joschu.net/blog/kl-approx.html.",
    )

    use_bias_correction_kl: bool = _field(
        False,
        "Multiply the per-token KL of the loss by the importance ratio rho (DeepSeek-V3.2, arXiv 2512.02556), so its "
        "gradient is the unbiased reverse-KL gradient when the data is off-policy. It changes the KL gradient even "
        "on-policy (rho = 1 but differentiable). False (the default) keeps DeepSeekMath's plain k3 term; TRL's "
        "default is True.",
    )
    off_policy_mask_threshold: float | None = _field(
        None,
        "DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9): a completion with a negative advantage "
        "whose mean token KL(pi_old || pi_theta) exceeds this threshold is left out of the policy term (not of the "
        "KL term). None turns it off; the paper's scale is around 0.5. Only acts when the policy moved since the "
        "rollout (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps).",
    )
    top_entropy_quantile: float = _field(
        1.0,
        "rho of 'Beyond the 80/20 rule' (arXiv 2506.01939): keep in the policy term only the tokens whose entropy is "
        "in the top rho quantile of the batch's completion tokens (all processes). 1.0 keeps every token; 0.0 only "
        "the highest-entropy one; the paper recommends 0.2. The KL term keeps every token.",
    )
    entropy_coef: float = _field(
        0.0,
        "Weight of an entropy bonus: loss = policy loss - entropy_coef x mean per-token entropy (over the tokens the "
        "policy term uses), the same meaning for every loss type. Encourages exploration. 0.0 turns it off. With "
        "`use_adaptive_entropy`, the starting coefficient. Logs `entropy_coef` and `policy_loss`.",
    )
    use_adaptive_entropy: bool = _field(
        False,
        "Skywork-OR1's adaptive entropy control (arXiv 2505.22312): after each optimizer step the coefficient rises "
        "by `entropy_coef_delta` when the step's mean entropy is <= `entropy_target` and falls otherwise, within "
        "[`entropy_coef_min`, `entropy_coef_max`]; the bonus is applied only while the last entropy was <= target. "
        "Its state is saved in checkpoints.",
    )
    entropy_coef_min: float = _field(0.0, "Lower bound of the adaptive entropy coefficient.")
    entropy_coef_max: float = _field(1.0, "Upper bound of the adaptive entropy coefficient.")
    entropy_coef_delta: float = _field(0.005, "Step of the adaptive entropy coefficient per optimizer step.")
    entropy_target: float = _field(
        0.2,
        "Target mean per-token entropy (nats) of adaptive entropy control, over the tokens the policy term uses. "
        "Language models sit at 2-10 nats, so 0.2 only acts on near-collapse: set it near the entropy logged early "
        "in training.",
    )

    # --- Reward-side penalties (the reward half of the dual penalty) ---
    reward_kl_coef: float = _field(
        0.0,
        "beta_r: weight of the KL penalty folded into the reward before group normalisation, r~_i = r_i - beta_r * "
        "sum_t KL_t(pi_old || pi_ref), as in PPO-RLHF (Ouyang et al. 2022, arXiv 2203.02155) and DeepSeekMath's "
        "dual penalty. 0 turns it off (the default). Worth turning on when the policy drifts (KL keeps growing, "
        "outputs degenerate) although `beta` is set: a completion's whole KL then lowers its advantage against its "
        "group, a sequence-level signal the per-token loss term does not give. Typical 0.01-0.1 with `k1`.",
    )
    reward_kl_estimator: str = _field(
        "k1",
        "Per-token estimator summed into the reward-side KL: `k1` (the log-ratio, unbiased for the sequence KL; the "
        "PPO-RLHF choice and the default), `k2` or `k3`.",
    )
    reward_kl_target: float | None = _field(
        None,
        "Target mean per-completion KL for the adaptive controller of Ziegler et al. 2019 (arXiv 1909.08593): beta_r "
        "starts at `reward_kl_coef` and is moved multiplicatively to keep the measured KL near the target. None "
        "keeps beta_r fixed. Ziegler et al. use 6 nats for 24-token completions.",
    )
    reward_kl_horizon: float = _field(
        10000,
        "Horizon of the adaptive controller in completions: how fast beta_r reacts (Ziegler et al. use 10000).",
    )
    overlong_buffer_len: int | None = _field(
        None,
        "L_cache of DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): completions longer than "
        "max_completion_length - L_cache lose up to `overlong_penalty_factor` reward, linearly, reaching it at "
        "max_completion_length. DAPO uses 4096 of 20480. None turns it off. Worth it when truncated answers are "
        "common (`completions/clipped_ratio` high) and you want shorter reasoning rather than to ignore them "
        "(`mask_truncated_completions`).",
    )
    overlong_penalty_factor: float = _field(
        1.0, "Largest overlong penalty, reached at max_completion_length (DAPO: 1.0)."
    )
    missing_eos_penalty: float | None = _field(
        None,
        "Subtracted from the reward of completions truncated without an EOS (as in TRL's online DPO trainer). A hard "
        "alternative to the soft overlong penalty. None turns it off.",
    )

    # --- Reference policy ---
    ref_model_mode: str = _field(
        "auto",
        "How pi_ref is held. `auto` (the default): `disabled_adapter` for PEFT models (the base model, no extra "
        "memory), `copy` for full fine-tuning, `none` when no KL term is on. `snapshot_adapter`: a frozen copy of the "
        "adapter, refreshed every `ref_model_sync_steps` steps: DeepSeekMath's iterative RL reference reset "
        "(arXiv 2402.03300, section 4.1.3) at the cost of one adapter; works on 4-bit bases. With `sync_ref_model`, "
        "`auto` picks `snapshot_adapter` for PEFT models (the disabled adapter has no weights of its own to mix).",
    )
    sync_ref_model: bool = _field(
        False,
        "TR-DPO's reference update (arXiv 2404.09656): every `ref_model_sync_steps` optimizer steps, pi_ref <- "
        "alpha * pi_theta + (1 - alpha) * pi_ref, weight by weight, with alpha = `ref_model_mixup_alpha`. Needs a "
        "reference with its own weights: `copy` (full fine-tuning) or `snapshot_adapter` (PEFT; the adapter weights "
        "are mixed). Needs a KL term (`beta` or `reward_kl_coef` > 0). Same as TRL, which supports it for full "
        "fine-tuning only.",
    )
    ref_model_mixup_alpha: float = _field(
        0.6,
        "alpha of TR-DPO's update pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref (with `sync_ref_model`); in "
        "[0, 1], 1 resets the reference to the policy. TR-DPO recommends 0.5 to 0.6. Same as TRL.",
    )
    ref_model_sync_steps: int = _field(
        512,
        "tau of TR-DPO: optimizer steps between reference updates. With `sync_ref_model`, the reference is mixed "
        "with the policy (`ref_model_mixup_alpha`); without it, the snapshot adapter (`ref_model_mode="
        "'snapshot_adapter'`) is reset to the policy's adapter (alpha = 1). Same default as TRL.",
    )

    # --- Memory ---
    logprob_chunk_size: int = _field(
        1024,
        "Completion tokens projected through the LM head at a time when computing log-probs, so the (B, T, V) logits "
        "are never materialised. Lower it if the LM head pass runs out of memory.",
    )
    gpu_memory_budget: str | None = _field(
        None,
        "Memory of the GPU to fit, with its unit, e.g. `'8GiB'` or `'24GB'` (GB read as GiB); a bare number or a size "
        "<= 0 is refused. When set, the trainer picks the "
        "largest `per_device_train_batch_size` whose step the memory planner (`python -m grpo_ext.plan`) predicts to "
        "fit, keeping `generation_batch_size` (and so the completions per optimizer step) by raising "
        "`gradient_accumulation_steps`; the choice and the predicted peak are logged at start. None (the default) "
        "keeps the batch as given. Not in TRL.",
    )

    # --- Task evaluation: is the model getting better at the task, not only at the reward? ---
    eval_reward_funcs: list[str] | None = _field(
        None,
        "Task metrics measured on the eval set at each evaluation (`eval_strategy` / `eval_steps`, and "
        "`trainer.evaluate()`): reward functions that return 1.0 for a correct completion, named as one of this "
        "trainer's reward functions (its name in `rewards/<name>/mean`), a `reward_models` registry name (`accuracy`, "
        "`answer_line`) or a dotted import path (`my_pkg.rewards:correct`). Each eval prompt is answered greedily, "
        "logged as `eval_pass@1/<name>` (DeepSeekMath's top-1 accuracy), and with `eval_num_samples=k > 1` also k "
        "times by sampling: `eval_sampled_pass@1/<name>`, `eval_pass@k/<name>`, `eval_maj@k/<name>`. Keep the best "
        "checkpoint on one with `metric_for_best_model='eval_pass@1/<name>'` and `load_best_model_at_end=True`. "
        "Rewards can rise while the task does not (reward hacking): a task metric is the check. None (the default): "
        "TRL's evaluation only. Not in TRL.",
    )
    eval_num_samples: int = _field(
        1,
        "Samples per eval prompt for the sampled task metrics (`eval_pass@k`, `eval_maj@k`; DeepSeekMath reports "
        "maj@64); 1 measures the greedy `eval_pass@1` only. Sampled with the training generation settings "
        "(`temperature`, ...). Not in TRL.",
    )
    eval_speculative_draft_tokens: int = _field(
        4,
        "Speculative decoding in the task metrics' greedy answers (`eval_reward_funcs`), drafting from the previous "
        "evaluation's answers to the same prompts (kept for up to `speculative_memory_prompts` prompts): the same "
        "answers token for token, in fewer forwards when the policy answers as it did before. Measured on the real "
        "model's held-out answers (CPU): 0.61x of plain decoding's time with the previous answers remembered, 1.22x "
        "at the first evaluation (benchmarks/README.md). 0 turns it off. Not in TRL.",
    )
    eval_task_metrics_only: bool = _field(
        False,
        "Evaluations measure the task metrics (`eval_reward_funcs`) only, skipping TRL's evaluation rollout "
        "(`num_generations_eval` sampled completions per prompt, their rewards and loss), which costs several times "
        "more than one greedy answer per prompt. Not in TRL.",
    )

    # --- Pre-flight check: will this run learn? ---
    doctor_steps: int = _field(
        0,
        "At the start of `train()` (not when resuming), sample this many generation batches of the untrained model "
        "on training prompts and log the pre-flight check of `python -m grpo_ext.doctor`: completions cut at "
        "`max_completion_length`, groups with zero reward spread (no learning signal), each reward's mean, spread, "
        "share of None and correlations, a reward paying on completions a task metric (`eval_reward_funcs`) marks "
        "wrong, the stop tokens, the learning rate for LoRA or full fine-tuning, bf16 on a CPU, the memory planner's "
        "verdict with `gpu_memory_budget`; then one verdict, `ready` or `will not learn because ...` with the fixes. "
        "It never stops training and does not change it: no gradient, nothing stepped, the random state restored. "
        "1 or 2 batches are enough; 0 (the default) skips it. Not in TRL.",
    )

    # --- Logging ---
    log_completions: bool = _field(
        False,
        "Every `logging_steps`: print a sample of (prompt, completion, reward), write the last rollout's table to "
        "`output_dir/completions/completions_<step>.parquet` and send it to wandb / trackio when they run (as TRL).",
    )
    num_completions_to_print: int | None = _field(
        4,
        "How many completions `log_completions` prints; None prints all. TRL's default is None.",
    )
    log_unique_prompts: bool = _field(
        False,
        "Show each prompt once in the completions table sent to wandb / trackio (its first completion), instead of "
        "one row per completion. The printed sample and the parquet files keep every row. Same as TRL.",
    )
    log_completions_hub_repo: str | None = _field(
        None,
        "Hub dataset repository (`user/name`, or `name` in your namespace) the completions tables are uploaded to: "
        "each logging step's `output_dir/completions/completions_<step>.parquet`, every 2 minutes in the background "
        "and once more at the end of training, with a dataset card. Needs `log_completions=True`. The repository is "
        "public unless `hub_private_repo=True` (or your organisation's default is private). Same as TRL.",
    )
    log_multimodal: bool = _field(
        True,
        "TRL's switch for logging the prompts' images: with a vision-language model, each row's images are kept in "
        "`trainer._logs['images']` as TRL keeps them (the completions table names image parts without their pixels). "
        "Videos are not supported.",
    )

    # --- Run doctor: live diagnosis (grpo_ext/diagnosis.py) ---
    doctor_live: bool = _field(
        True,
        "While training, read the logged metrics and say once, in plain words with the numbers, the step and the fix, "
        "when the run is not learning: groups without reward spread, truncation or length running away, heavy PPO "
        "clipping, entropy collapse, KL explosion, the training reward rising while the eval task metric falls "
        "(reward hacking); and, the first time the loss is 0, why. Each signal is also logged as `doctor/<signal>` "
        "(1.0 while it fires, else 0.0) so trackers chart it. Cheap: it only reads the metrics already logged. It "
        "restarts counting after a resume. Not in TRL.",
    )
    doctor_patience: int = _field(
        5,
        "Logging steps in a row a condition must hold before the run doctor reports it (zero-spread groups, "
        "truncation, length growth, PPO clipping, entropy collapse), and the window over which `doctor_kl_growth` is "
        "measured. 5: long enough for one odd batch not to count, short enough to warn before much compute is spent. "
        ">= 1.",
    )
    doctor_zero_std_threshold: float = _field(
        0.9,
        "Report when `frac_reward_zero_std`, the share of groups whose completions all got the same reward (zero "
        "advantages: no gradient), stays above this for `doctor_patience` logs. 0.9: only a tenth of the batch still "
        "teaches anything. Fixes: `dynamic_sampling=True`, easier or harder data, a larger `num_generations`. In "
        "[0, 1]; 1 turns it off.",
    )
    doctor_clipped_ratio_threshold: float = _field(
        0.5,
        "Report when `completions/clipped_ratio`, the share of completions cut at `max_completion_length` before a "
        "stop token, stays above this for `doctor_patience` logs. 0.5: half the rewards then score unfinished "
        "answers. In [0, 1]; 1 turns it off.",
    )
    doctor_length_fraction: float = _field(
        0.8,
        "Report when `completions/mean_length` rose on `doctor_patience` logs in a row and reached this fraction of "
        "`max_completion_length`: truncation is coming. 0.8 leaves time to act before completions are cut. In "
        "(0, 1].",
    )
    doctor_clip_ratio_threshold: float = _field(
        0.2,
        "Report when `clip_ratio/region_mean`, the share of tokens whose ratio pi_theta / pi_old PPO clipped, stays "
        "above this for `doctor_patience` logs: the policy moves too far per rollout, and clipped tokens give no "
        "gradient. It is 0 when each rollout serves one optimizer step; at 0.2 a fifth of the tokens no longer steer "
        "the update. In [0, 1]; 1 turns it off.",
    )
    doctor_entropy_floor: float = _field(
        0.05,
        "Report an entropy collapse when the mean per-token `entropy` stays below this many nats for "
        "`doctor_patience` logs: the policy is then nearly greedy, a group's completions are alike and exploration "
        "stops. >= 0; 0 turns this rule off.",
    )
    doctor_entropy_drop: float = _field(
        0.1,
        "Report an entropy collapse too when `entropy` stays below this fraction of its first logged value for "
        "`doctor_patience` logs: 0.1 is a tenfold fall, well beyond the slow decline of a run that learns. In [0, 1]; "
        "0 turns this rule off.",
    )
    doctor_kl_threshold: float = _field(
        1.0,
        "Report a KL explosion when the logged `kl` (mean per-token KL to the reference, logged when `beta` > 0) goes "
        "above this many nats: a run that learns usually stays far below 1 nat per token; above it the policy has "
        "left the reference behind. > 0.",
    )
    doctor_kl_growth: float = _field(
        10.0,
        "Report a KL explosion too when `kl` grew more than this many times over the last `doctor_patience` logs "
        "from at least 0.05 nats per token, so the early many-fold climb from 0 (the policy starts as the reference) "
        "does not count. > 1.",
    )
    doctor_hacking_patience: int = _field(
        2,
        "Report reward hacking when, at this many evaluations in a row, the mean training `reward` logged since the "
        "previous evaluation rose while the eval task metric fell. The task metric is `metric_for_best_model` when "
        "set (not the loss, 0 by design in GRPO), else the first `eval_pass@1/...` metric logged. 2: one fall can "
        "be noise, two while the reward climbs are a pattern. >= 1.",
    )

    _VALID_DICT_FIELDS = _BaseConfig._VALID_DICT_FIELDS + [
        "model_init_kwargs",
        "generation_kwargs",
        "chat_template_kwargs",
        "transformers_continuous_batching_config",
    ]

    def __getstate__(self) -> dict:
        """What pickling writes, e.g. `training_args.bin`, which transformers saves with `torch.save(args)` in the
        output folder, in every checkpoint and before each full-model upload: every field but credentials.
        `hub_token` is written as None and the keys of dict fields (`model_init_kwargs`, ...) that may hold a
        credential (`is_secret_key`, the rule the model card's config follows too) are left out, so no file the
        trainer writes holds a token. A resumed run takes the token from its own config or the environment
        (`HF_TOKEN`, `hf auth login`), as a fresh run does: nothing reads it back from a checkpoint.
        """
        state = dict(self.__dict__)
        state["hub_token"] = None
        for name, value in state.items():
            if isinstance(value, dict):
                state[name] = {k: v for k, v in value.items() if not is_secret_key(k)}
        return state

    def __copy__(self):  # copies keep the token: only pickles (files) leave it out
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def __post_init__(self):
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards, self.scale_rewards
        )
        self._refuse_unsupported_trl_fields()  # first: the reason, before any check of TrainingArguments
        # TRL's fields keep the names transformers 5.24 deprecated (`gradient_checkpointing*`, TRL's default True).
        # Passed on to the new names here, as transformers does itself when only the old one is set, they load
        # without a FutureWarning for every config built; the old names keep mirroring the new ones.
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
        if self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        super().__post_init__()
        if self.use_transformers_paged:
            warnings.warn(  # TRL's message (a FutureWarning there too)
                "`use_transformers_paged` is deprecated and will be removed in v2.0.0. Use "
                "`use_transformers_continuous_batching` instead.",
                FutureWarning,
                stacklevel=3,
            )
            self.use_transformers_continuous_batching = True
        self._resolve_pad_to_multiple_of()
        self._warn_default_clipping()  # before epsilon_high takes epsilon's value
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.trust_remote_code:  # every loader of grpo-ext reads model_init_kwargs
            self.model_init_kwargs = {**(self.model_init_kwargs or {}), "trust_remote_code": True}
        self._check_values()
        self._resolve_generation_batch()

    def _resolve_pad_to_multiple_of(self) -> None:
        """As TRL: the command line gives a string ("64", "none"); `auto` pads to 128 on Neuron only, which compiles
        once per input shape."""
        value = self.pad_to_multiple_of
        if isinstance(value, str) and value != "auto":
            try:
                value = None if value.lower() in ("none", "null") else int(value)
            except ValueError:
                raise ValueError(f"pad_to_multiple_of={value!r} must be an int >= 1, 'auto' or None.") from None
        if value == "auto":
            value = 128 if self.device.type == "neuron" else None
        self.pad_to_multiple_of = value

    def surrogate_params(self) -> SurrogateParams:
        """The hyperparameters of the loss types' surrogates (`objective.SurrogateParams`), from the fields of the same
        names (`epsilon_low` is `epsilon`)."""
        from .objective import SurrogateParams

        names = [f.name for f in dataclasses.fields(SurrogateParams) if f.name != "epsilon_low"]
        return SurrogateParams(epsilon_low=self.epsilon, **{name: getattr(self, name) for name in names})

    def _refuse_unsupported_trl_fields(self) -> None:
        """A refused TRL field (`REFUSED_TRL_FIELDS`) set to anything but TRL's default is an error naming it. Where
        `trl.GRPOTrainer` itself rejects the combination, its message comes first, so a check written for TRL matches."""
        liger_kernel_config = self.liger_kernel_config if isinstance(self.liger_kernel_config, dict) else {}
        if self.use_liger_kernel and liger_kernel_config.get("fused_linear_cross_entropy"):
            raise ValueError(
                '`liger_kernel_config={"fused_linear_cross_entropy": True}` is not supported: it replaces the '
                "model's forward, which this trainer patches with a fused LM head. Nor is use_liger_kernel=True by "
                f"GRPOExtConfig: {REFUSED_TRL_FIELDS['use_liger_kernel']}"
            )
        defaults = _trl_field_defaults()
        for name, reason in REFUSED_TRL_FIELDS.items():
            value, default = getattr(self, name, None), defaults.get(name)
            if value == default:
                continue
            raise ValueError(
                f"{name}={value!r} is not supported by GRPOExtConfig (TRL's default {default!r} is accepted). {reason}"
            )

    def _warn_default_clipping(self) -> None:
        """A loss type whose recommended clipping differs from the default left in place (`RECOMMENDED_CLIPPING`):
        it trains, but not as meant (TRL says nothing)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, (value, source, effect) in RECOMMENDED_CLIPPING.get(self.loss_type, {}).items():
            if getattr(self, name) == defaults[name]:
                warnings.warn(
                    f"loss_type={self.loss_type!r} with {name} left at its default: {effect}. Set {name}={value} "
                    f"({source}), or set {name} explicitly to keep a smaller cap.",
                    stacklevel=4,
                )

    def _check_values(self):
        """Each field against itself and the other fields; the rules that need another module's tables run at
        trainer start (`settings.check_settings`)."""

        def require(condition: bool, message: str):
            if not condition:
                raise ValueError(message)

        require(
            self.num_generations >= 2,
            f"num_generations={self.num_generations}: GRPO needs at least 2 completions per prompt to compare them "
            "(the advantage is the reward minus the group mean). Set num_generations >= 2, e.g. 8.",
        )
        require(
            self.max_completion_length >= 1,
            f"max_completion_length={self.max_completion_length} must be >= 1.",
        )
        require(
            self.max_tool_calling_iterations is None or self.max_tool_calling_iterations >= 0,
            f"max_tool_calling_iterations={self.max_tool_calling_iterations} must be None (no limit) or >= 0.",
        )
        for name in ("tool_timeout", "environment_reset_timeout", "reward_timeout"):
            value = getattr(self, name)
            require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                f"{name}={value!r} must be a number of seconds > 0, or None for no limit.",
            )
        require(
            self.max_prompt_length is None or self.max_prompt_length >= 1,
            f"max_prompt_length={self.max_prompt_length} must be >= 1, or None to check prompts without cutting them.",
        )
        require(self.beta >= 0, f"beta={self.beta} must be >= 0 (0 turns the KL term off; DeepSeekMath uses 0.04).")
        require(
            self.epsilon > 0 and self.epsilon_high > 0,
            f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high}: clipping ranges must be > 0 (typical 0.2).",
        )
        require(self.epsilon < 1, f"epsilon={self.epsilon} must be < 1, or the lower clip bound 1 - epsilon is <= 0.")
        require(
            self.delta is None or self.delta > 1 + self.epsilon_high,
            f"delta={self.delta} must be > 1 + epsilon_high = {1 + self.epsilon_high} (INTELLECT-2 uses 4), or None "
            "to turn two-sided clipping off.",
        )
        require(
            self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0,
            f"sapo_temperature_pos={self.sapo_temperature_pos}, sapo_temperature_neg={self.sapo_temperature_neg} "
            "must be > 0 (the paper uses 1.0 and 1.05).",
        )
        require(
            0.0 <= self.top_entropy_quantile <= 1.0,
            f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1] (1.0 keeps every token; the paper "
            "uses 0.2).",
        )
        require(
            self.off_policy_mask_threshold is None or self.off_policy_mask_threshold > 0,
            f"off_policy_mask_threshold={self.off_policy_mask_threshold} must be > 0 (e.g. 0.5), or None to turn the "
            "mask off.",
        )
        require(
            0 <= self.entropy_coef_min <= self.entropy_coef_max and self.entropy_coef_delta >= 0,
            f"entropy_coef_min={self.entropy_coef_min}, entropy_coef_max={self.entropy_coef_max}, "
            f"entropy_coef_delta={self.entropy_coef_delta}: need 0 <= min <= max and delta >= 0.",
        )
        require(self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1.")
        require(
            self.speculative_draft_tokens >= 0,
            f"speculative_draft_tokens={self.speculative_draft_tokens} must be >= 0 (0 turns drafting off; 4 to 8 "
            "on a GPU).",
        )
        require(
            self.eval_speculative_draft_tokens >= 0,
            f"eval_speculative_draft_tokens={self.eval_speculative_draft_tokens} must be >= 0 (0 turns it off).",
        )
        require(self.speculative_ngram_size >= 1, f"speculative_ngram_size={self.speculative_ngram_size} must be >= 1.")
        require(
            self.speculative_memory_prompts >= 0,
            f"speculative_memory_prompts={self.speculative_memory_prompts} must be >= 0 (0 keeps no earlier drafts).",
        )
        require(
            self.num_generations_eval is None or self.num_generations_eval >= 1,
            f"num_generations_eval={self.num_generations_eval} must be >= 1, or None to use num_generations.",
        )
        require(
            self.eval_num_samples >= 1,
            f"eval_num_samples={self.eval_num_samples} must be >= 1 (1: greedy pass@1 only; k: pass@k and maj@k too).",
        )
        require(
            not self.eval_task_metrics_only or bool(self.eval_reward_funcs),
            "eval_task_metrics_only=True needs task metrics: set eval_reward_funcs (e.g. ['accuracy']).",
        )
        require(
            self.doctor_steps >= 0,
            f"doctor_steps={self.doctor_steps} must be >= 0 (0 skips the pre-flight check; 1 or 2 batches are enough).",
        )
        require(
            self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
            f"importance_sampling_level={self.importance_sampling_level!r} is not one of {IMPORTANCE_SAMPLING_LEVELS}.",
        )
        require(
            self.scale_rewards in SCALE_REWARDS, f"scale_rewards={self.scale_rewards!r} is not one of {SCALE_REWARDS}."
        )
        require(self.temperature > 0, f"temperature={self.temperature} must be > 0.")
        self._check_generation_kwargs(require)
        require(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1].")
        require(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 disables top-k).")
        require(self.min_p is None or 0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1].")
        require(self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0.")
        require(self.reward_kl_coef >= 0, f"reward_kl_coef={self.reward_kl_coef} must be >= 0 (0 turns it off).")
        require(
            self.reward_kl_target is None or (self.reward_kl_target > 0 and self.reward_kl_coef > 0),
            f"reward_kl_target={self.reward_kl_target} needs a target > 0 and a starting reward_kl_coef > 0 (the "
            f"controller scales reward_kl_coef={self.reward_kl_coef} multiplicatively, so it cannot start at 0); "
            "e.g. reward_kl_coef=0.05.",
        )
        require(self.reward_kl_horizon > 0, f"reward_kl_horizon={self.reward_kl_horizon} must be > 0.")
        require(
            self.overlong_buffer_len is None or 0 < self.overlong_buffer_len <= self.max_completion_length,
            f"overlong_buffer_len={self.overlong_buffer_len} must be in (0, max_completion_length="
            f"{self.max_completion_length}]: the penalty ramps over the last overlong_buffer_len tokens. Lower it "
            "(DAPO uses a fifth of the length) or set None to turn the penalty off.",
        )
        require(
            self.overlong_penalty_factor >= 0,
            f"overlong_penalty_factor={self.overlong_penalty_factor} must be >= 0 (it is subtracted from rewards).",
        )
        require(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted from rewards).",
        )
        require(self.ref_model_sync_steps >= 1, f"ref_model_sync_steps={self.ref_model_sync_steps} must be >= 1.")
        require(
            0.0 <= self.ref_model_mixup_alpha <= 1.0,
            f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in [0, 1] (TR-DPO uses 0.5 to 0.6; 1 resets "
            "the reference to the policy).",
        )
        require(
            not self.sync_ref_model or self.beta > 0 or self.reward_kl_coef > 0,
            "sync_ref_model=True but no KL term uses the reference (beta=0 and reward_kl_coef=0): there is nothing "
            "to synchronize. Set sync_ref_model=False, or beta > 0.",
        )
        require(
            self.pad_to_multiple_of is None
            or (isinstance(self.pad_to_multiple_of, int) and self.pad_to_multiple_of >= 1),
            f"pad_to_multiple_of={self.pad_to_multiple_of!r} must be an int >= 1, 'auto' or None.",
        )
        require(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0 (0.0 turns the load-balancing loss off; "
            "None takes the model config's coefficient).",
        )
        require(
            self.log_completions_hub_repo is None or self.log_completions,
            "log_completions_hub_repo is set, but log_completions is False: enable log_completions to upload the "
            "completions to the Hub, or unset log_completions_hub_repo.",
        )
        require(self.max_sampling_rounds >= 1, f"max_sampling_rounds={self.max_sampling_rounds} must be >= 1.")
        require(self.logprob_chunk_size >= 1, f"logprob_chunk_size={self.logprob_chunk_size} must be >= 1.")
        require(
            self.reward_weights is None or all(isinstance(w, (int, float)) for w in self.reward_weights),
            f"reward_weights={self.reward_weights} must be a list of numbers.",
        )
        require(
            self.doctor_patience >= 1 and self.doctor_hacking_patience >= 1,
            f"doctor_patience={self.doctor_patience} and doctor_hacking_patience={self.doctor_hacking_patience} must "
            "each be >= 1 (logs, evaluations in a row).",
        )
        for name in (
            "doctor_zero_std_threshold",
            "doctor_clipped_ratio_threshold",
            "doctor_clip_ratio_threshold",
            "doctor_entropy_drop",
        ):
            require(0.0 <= getattr(self, name) <= 1.0, f"{name}={getattr(self, name)} must be in [0, 1] (a fraction).")
        require(
            0.0 < self.doctor_length_fraction <= 1.0,
            f"doctor_length_fraction={self.doctor_length_fraction} must be in (0, 1] (of max_completion_length).",
        )
        require(self.doctor_entropy_floor >= 0, f"doctor_entropy_floor={self.doctor_entropy_floor} must be >= 0.")
        require(
            self.doctor_kl_threshold > 0 and self.doctor_kl_growth > 1,
            f"doctor_kl_threshold={self.doctor_kl_threshold} must be > 0 and doctor_kl_growth="
            f"{self.doctor_kl_growth} > 1 (a growth factor).",
        )
        require(
            not self.auto_find_batch_size,
            "auto_find_batch_size=True is not supported: shrinking the batch on OOM would split prompt groups. "
            "Set it to False and lower per_device_train_batch_size instead.",
        )

    def _check_generation_kwargs(self, require) -> None:
        """`generation_kwargs` override the sampling fields: not with settings that break GRPO's group. Greedy
        decoding there is allowed (reproducible rollouts for tests and debugging) but warned about: it trains
        nothing."""
        kwargs = self.generation_kwargs if isinstance(self.generation_kwargs, dict) else {}
        if kwargs.get("do_sample", True) is False:
            warnings.warn(
                f"generation_kwargs={kwargs}: greedy decoding gives the num_generations completions of a prompt the "
                "same tokens, so every advantage is 0 and nothing is learned (temperature=0 is refused for the same "
                "reason). Fine for reproducible test rollouts; to train, remove do_sample from generation_kwargs "
                "and lower temperature (e.g. 0.6) for less random samples.",
                stacklevel=5,
            )
        require(
            kwargs.get("num_return_sequences", 1) == 1,
            f"generation_kwargs={kwargs}: num_return_sequences is set by the trainer, which repeats each prompt "
            "num_generations times itself. Remove it and set num_generations instead.",
        )
        require(
            kwargs.get("temperature", self.temperature) == self.temperature,
            f"generation_kwargs={kwargs} samples at another temperature than temperature={self.temperature}, which "
            "scoring divides the logits by, so the log-probs and ratios of the loss would not be those of the "
            "sampling policy. Set the field temperature instead and remove it from generation_kwargs.",
        )

    def resize_micro_batch(self, per_device_train_batch_size: int, gradient_accumulation_steps: int) -> None:
        """Change the micro-batch of this resolved config, keeping the rollout: `generation_batch_size` stays, and
        `steps_per_generation` is resolved again from it (so is the check that groups stay whole). The one place a
        built config's batch changes: the trainer calls it with the micro-batch `gpu_memory_budget` fits
        (`plan.fit_batch_size`, returned by `models.prepare_policy`)."""
        self.per_device_train_batch_size = per_device_train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.steps_per_generation = None  # derived from the kept generation_batch_size
        self._resolve_generation_batch()

    def _resolve_generation_batch(self):
        """Fill in generation_batch_size / steps_per_generation (as TRL does) and check groups stay whole."""
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "generation_batch_size and steps_per_generation are mutually exclusive: set only one of them."
            )
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            if self.generation_batch_size % global_batch != 0:
                raise ValueError(
                    f"generation_batch_size={self.generation_batch_size} must be a multiple of the global batch "
                    f"per_device_train_batch_size x num_processes = {global_batch}."
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        local_rollout = self.per_device_train_batch_size * self.steps_per_generation
        if self.dynamic_sampling and local_rollout % self.num_generations != 0:
            raise ValueError(
                f"dynamic_sampling drops whole groups, so each process must hold whole groups: "
                f"per_device_train_batch_size x steps_per_generation = {local_rollout} must be a multiple of "
                f"num_generations={self.num_generations}."
            )
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"The generation batch ({self.generation_batch_size} completions = per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x {self.world_size} process(es) x steps_per_generation "
                f"{self.steps_per_generation}) is not divisible by num_generations={self.num_generations}, so a "
                "prompt's group would be split. Make per_device_train_batch_size x num_processes x "
                "steps_per_generation a multiple of num_generations (e.g. per_device_train_batch_size="
                f"{self.num_generations}), or choose num_generations that divides {self.generation_batch_size}."
            )


# Headings of the docstring, at the first field of each group (fields are declared group by group).
_SECTION_STARTS = {
    "learning_rate": "Defaults overridden from TrainingArguments",
    "model_init_kwargs": "Model",
    "num_generations": "Data and generation",
    "beta": "Objective",
    "reward_kl_coef": "Reward-side penalties",
    "ref_model_mode": "Reference policy",
    "logprob_chunk_size": "Memory",
    "eval_reward_funcs": "Task evaluation: is the model getting better at the task, not only at the reward?",
    "doctor_steps": "Pre-flight check",
    "log_completions": "Logging",
    "doctor_live": "Run doctor: live diagnosis",
}


def _document(cls):
    """Append a TRL-style `Parameters:` section, built from each field's help, to the class docstring."""
    own = [f for f in dataclasses.fields(cls) if f.name in cls.__annotations__ and not f.name.startswith("_")]
    lines = [
        "Configuration of `GRPOExtTrainer`: GRPO (DeepSeekMath, arXiv 2402.03300) with grpo-ext's extensions.",
        "",
        "Derives from TRL's `_BaseConfig` (itself `transformers.TrainingArguments`); every TrainingArguments field "
        "works as usual. Every `trl.GRPOConfig` field is accepted under its name: implemented with TRL's meaning, or, "
        "for the fields listed at the end, accepted only at TRL's default. Defaults that differ from "
        "`trl.GRPOConfig`: `beta` (0.04, TRL 0.0), `loss_type` (`grpo`, TRL `dapo`), `use_bias_correction_kl` "
        "(False, TRL True) and `num_completions_to_print` (4, TRL None).",
        "",
        "Pickled (as in `training_args.bin`, in the output folder and every checkpoint), the config holds no "
        "token: `hub_token` is saved as None and credential keys of dict fields (`token`, `api_key`, ...) are left "
        "out. A resumed run takes the token again from its config or the environment (`HF_TOKEN`, `hf auth login`).",
        "",
        "Building a config checks each field against itself and the other fields; the rules that need another "
        "module's knowledge (loss types, reference modes, memory sizes, ...) run at trainer start, from "
        "`grpo_ext.settings.check_settings`.",
        "",
        "Parameters:",
    ]
    for f in own:
        if f.name in _SECTION_STARTS:
            lines += ["", f"    > {_SECTION_STARTS[f.name]}", ""]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"    {f.name} (*optional*, defaults to `{default!r}`):")
        lines.append(f"        {f.metadata['help']}")
    lines += ["", "    > TRL fields not supported (only TRL's default is accepted; anything else is an error)", ""]
    lines += [f"    {name}: {reason}" for name, reason in REFUSED_TRL_FIELDS.items()]
    cls.__doc__ = "\n".join(lines)
    return cls


_document(GRPOExtConfig)
