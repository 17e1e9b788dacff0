"""The GRPO objective: KL estimator, importance ratio, per-loss-type surrogates, token masks, loss aggregation and
the entropy bonus.

Pure functions of tensors; nothing here knows about models or trainers. Formulas: DeepSeekMath (arXiv 2402.03300)
eq. 3-4, DAPO (arXiv 2503.14476), Dr. GRPO (arXiv 2503.20783), GSPO (arXiv 2507.18071), CISPO (MiniMax-M1,
arXiv 2506.13585), SAPO (arXiv 2511.20347), LUSPO (arXiv 2602.05261), VESPO (arXiv 2602.10693), two-sided clipping
(INTELLECT-2, arXiv 2505.07291), off-policy sequence masking and bias-corrected KL (DeepSeek-V3.2,
arXiv 2512.02556), high-entropy token selection (Beyond the 80/20 rule, arXiv 2506.01939), adaptive entropy control
(Skywork-OR1, arXiv 2505.22312), the MoE load-balancing term (Switch Transformer, arXiv 2101.03961); see
docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)

KL_ESTIMATORS = ("k1", "k2", "k3")


def per_token_kl(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Schulman's estimators of KL(pi || pi_ref) from tokens sampled from pi (http://joschu.net/blog/kl-approx.html).

    With log r = ref_logp - logp:
    - k1 = -log r                 unbiased, can be negative per token (the plain log-ratio; PPO-RLHF's reward KL)
    - k2 = (log r)^2 / 2          biased, >= 0, low variance
    - k3 = exp(log r) - log r - 1 unbiased, >= 0 (DeepSeekMath's loss term)
    """
    log_ratio = ref_per_token_logps - per_token_logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return log_ratio**2 / 2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}.")


def log_importance_weights(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    level: str = "token",
) -> torch.Tensor:
    """log rho: per token `(B, C)`, or GSPO's length-normalised sequence value `(B, 1)` for level="sequence"."""
    log_ratio = per_token_logps - old_per_token_logps  # (B, C)
    if level == "token":
        return log_ratio
    if level == "sequence":
        lengths = completion_mask.sum(-1).clamp(min=1.0)  # (B,)
        return ((log_ratio * completion_mask).sum(-1) / lengths).unsqueeze(-1)  # (B, 1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}.")


# --- Surrogates: the policy term of each loss type, before masks, KL and aggregation ---


@dataclass(frozen=True)
class SurrogateParams:
    """Hyperparameters of the surrogates; each is the `GRPOExtConfig` / `trl.GRPOConfig` field of the same name
    (`epsilon_low` is `epsilon`)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass
class Surrogate:
    """A loss type's policy term and what it logs."""

    policy_loss: torch.Tensor  # (B, C), or (B, 1) when every token of a sequence shares it
    is_low_clipped: torch.Tensor | None = None  # bool, the ratio's shape; None: this loss type does not PPO-clip
    is_high_clipped: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> per-token (B, C) or per-sequence (B, 1)


def _clipped(ratio, log_ratio, per_token_logps, advantages, completion_mask, p: SurrogateParams) -> Surrogate:
    """PPO's clip: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); with `delta`, rho itself is capped at delta
    first (INTELLECT-2's two-sided clipping: a negative advantage with a huge ratio is bounded too)."""
    clipped_ratio = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.epsilon_high)
    if p.delta is not None:
        ratio = torch.clamp(ratio, max=p.delta)
    return Surrogate(
        policy_loss=-torch.min(ratio * advantages, clipped_ratio * advantages),
        is_low_clipped=(ratio < 1 - p.epsilon_low) & (advantages < 0),
        is_high_clipped=(ratio > 1 + p.epsilon_high) & (advantages > 0),
    )


def _cispo(ratio, log_ratio, per_token_logps, advantages, completion_mask, p: SurrogateParams) -> Surrogate:
    """CISPO (MiniMax-M1): -sg(min(rho, eps_high)) A log pi. The weight is capped and detached, so every token keeps
    a REINFORCE gradient; `epsilon_high` is the cap itself here (eps_max, ScaleRL recommends 5.0)."""
    weight = torch.clamp(ratio, max=p.epsilon_high).detach()
    capped = (ratio > p.epsilon_high) & (advantages > 0)
    return Surrogate(policy_loss=-weight * advantages * per_token_logps, metrics={"cispo_clip_ratio": capped.float()})


def _sapo(ratio, log_ratio, per_token_logps, advantages, completion_mask, p: SurrogateParams) -> Surrogate:
    """SAPO: a smooth gate instead of the clip, -4/tau sigmoid(tau (rho - 1)) A, with tau_pos for A > 0 and tau_neg
    otherwise; its gradient at rho = 1 is the plain policy gradient and fades as rho leaves 1."""
    temperature = torch.where(advantages > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
    gate = torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature
    return Surrogate(policy_loss=-gate * advantages)


def vespo_weights(log_ratio: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor, p: SurrogateParams):
    """VESPO's sequence weight phi(w) = exp(lambda + k log w - lambda w) (phi(1) = 1) of the *summed* sequence log
    ratio w = prod_t rho_t, `(B, 1)`, detached; (k, lambda) = (k_pos, lambda_pos) for A >= 0, else the `neg` pair.
    log rho_t is clamped to [-20, 20] and log w to [log 1e-8, 20], as in the paper's code."""
    with torch.no_grad():
        log_w = (torch.clamp(log_ratio, -20.0, 20.0) * completion_mask).sum(-1, keepdim=True)  # (B, 1)
        log_w = torch.clamp(log_w, math.log(1e-8), 20.0)
        non_negative = advantages >= 0
        k = torch.where(non_negative, p.vespo_k_pos, p.vespo_k_neg)
        lam = torch.where(non_negative, p.vespo_lambda_pos, p.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo(ratio, log_ratio, per_token_logps, advantages, completion_mask, p: SurrogateParams) -> Surrogate:
    """VESPO: -phi(w) A log pi, phi a detached Gamma-shaped weight of the sequence ratio (`vespo_weights`)."""
    phi = vespo_weights(log_ratio, advantages, completion_mask, p)  # (B, 1)
    return Surrogate(policy_loss=-phi * advantages * per_token_logps, metrics={"vespo/phi_seq_mean": phi})


# --- Aggregation: this micro-batch's share of the window's loss ---


@dataclass(frozen=True)
class Normalisers:
    """What a loss type may divide by: counts over the window of micro-batches one optimizer step accumulates."""

    num_sequences: float  # completions in the window, this process
    num_tokens: float  # completion tokens in the window, this process
    num_global_tokens: float  # completion tokens in the window on all processes / number of processes (DDP averages)
    max_completion_length: int


def _sequence_mean(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    sequence_means = masked_loss.sum(-1) / completion_mask.sum(-1).clamp(min=1.0)  # (B,)
    return sequence_means.sum() / n.num_sequences


def _global_token_mean(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / max(n.num_global_tokens, 1.0)


def _token_mean(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / max(n.num_tokens, 1.0)


def _constant_length(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / (n.num_sequences * n.max_completion_length)


def _sequence_sum(masked_loss: torch.Tensor, completion_mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    return masked_loss.sum() / n.num_sequences


@dataclass(frozen=True)
class LossType:
    surrogate: Callable[..., Surrogate]
    aggregate: Callable[[torch.Tensor, torch.Tensor, Normalisers], torch.Tensor]


# Every loss type: its name (config's `loss_type`) -> its surrogate and its aggregation. Summed over the window's
# micro-batches, with L_it the token losses:
#   grpo:    clip,  1/N sum_i 1/|o_i| sum_t L_it     (DeepSeekMath: mean over tokens, then over completions)
#   dapo:    clip,  sum_it L_it / sum_i |o_i|        (DAPO: token mean over the global batch)
#   dr_grpo: clip,  sum_it L_it / (N * max_completion_length)   (Dr. GRPO: no length bias)
#   bnpo:    clip,  sum_it L_it / sum_i |o_i|        (token mean over this process's batch)
#   luspo:   clip,  1/N sum_i sum_t L_it             (LUSPO: GSPO's sequence loss scaled by its length)
#   cispo:   -sg(min(rho, eps_high)) A log pi,  aggregated as dapo   (MiniMax-M1)
#   sapo:    -4/tau sigmoid(tau (rho - 1)) A,   aggregated as grpo   (SAPO)
#   vespo:   -sg(phi(w)) A log pi,              aggregated as dapo   (VESPO)
# Adding a loss type: a surrogate and / or aggregation here, its entry and line above, and closed-form cases in
# tests/test_objective.py.
LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(_clipped, _sequence_mean),
    "dapo": LossType(_clipped, _global_token_mean),
    "dr_grpo": LossType(_clipped, _constant_length),
    "bnpo": LossType(_clipped, _token_mean),
    "luspo": LossType(_clipped, _sequence_sum),
    "cispo": LossType(_cispo, _global_token_mean),
    "sapo": LossType(_sapo, _sequence_mean),
    "vespo": LossType(_vespo, _global_token_mean),
}
# Loss types whose aggregation sums a sequence's token losses: a sequence-level ratio then weights each sequence by
# its length instead of optimising GSPO's per-sequence objective (TRL warns about the same combinations).
TOKEN_SUMMED_LOSS_TYPES = ("dapo", "dr_grpo", "bnpo", "cispo")


def lookup_loss_type(loss_type: str) -> LossType:
    """`LOSS_TYPES[loss_type]`, or an error naming the field and its choices: the one check of a loss type's name."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {tuple(LOSS_TYPES)}.")
    return LOSS_TYPES[loss_type]


def check_objective_settings(args) -> None:
    """A config's loss type and KL estimators are known here (run by `settings.check_settings`, at trainer start), and
    the warnings `trl.GRPOTrainer` gives at start for loss settings that run but are probably not what was meant."""
    lookup_loss_type(args.loss_type)
    if args.kl_estimator not in KL_ESTIMATORS or args.reward_kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator={args.kl_estimator!r} and reward_kl_estimator={args.reward_kl_estimator!r} must each be one "
            f"of {KL_ESTIMATORS}."
        )
    # TRL's warnings, word for word and through a logger as TRL logs them, so code capturing TRL's log sees them
    if args.loss_type == "luspo" and args.importance_sampling_level != "sequence":
        logger.warning(
            "When using `'luspo'` loss, `importance_sampling_level` should be set to `'sequence'` to mirror the "
            "paper's setup."
        )
    if args.loss_type == "vespo" and args.importance_sampling_level != "token":
        logger.warning(
            "VESPO computes sequence-level importance weights internally. `importance_sampling_level` should be "
            "set to `'token'` (the default)."
        )
    if args.importance_sampling_level == "sequence" and args.loss_type in TOKEN_SUMMED_LOSS_TYPES:
        logger.warning(
            f"When using `importance_sampling_level='sequence'`, the `'{args.loss_type}'` loss sums per-token "
            "contributions, which effectively weights each sequence by its completion length instead of "
            "optimizing the per-sequence objective. To reproduce the GSPO paper's setup, set `loss_type='grpo'` "
            "(see https://huggingface.co/docs/trl/main/en/paper_index#group-sequence-policy-optimization)."
        )


# --- Token and sequence masks ---


def off_policy_mask(
    advantages: torch.Tensor,
    per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (eq. 9), `(B, 1)`: 0 for a completion with A < 0 whose mean token
    KL(pi_sampling || pi_theta) = mean_t (log pi_sampling - log pi_theta) exceeds `threshold`, else 1."""
    log_ratio = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)  # (B, C)
    mean_kl = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(-1, keepdim=True).clamp(min=1.0)
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    return ((advantages >= 0) | (mean_kl <= threshold)).to(completion_mask.dtype)


def high_entropy_mask(
    entropies: torch.Tensor,
    completion_mask: torch.Tensor,
    quantile: float,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda values: values,
) -> torch.Tensor:
    """Tokens whose entropy is at least the `quantile` quantile of the entropies of all completion tokens, `(B, C)`
    bool ("Beyond the 80/20 rule": `quantile = 1 - top_entropy_quantile`). `gather` collects the 1-D entropies of every
    process (the trainer passes its padded all-gather); the default is one process."""
    values = gather(entropies.detach()[completion_mask.bool()].float())
    if values.numel() == 0:
        return torch.zeros_like(completion_mask, dtype=torch.bool)
    threshold = torch.quantile(values, quantile)
    return (entropies.detach() * completion_mask >= threshold) & completion_mask.bool()


# --- The whole per-token loss ---


@dataclass
class ObjectiveTerms:
    """Per-token pieces of the GRPO loss, kept for aggregation and logging."""

    per_token_loss: torch.Tensor  # (B, C), or (B, 1) at sequence level with beta == 0 and no token mask
    per_token_kl: torch.Tensor | None  # (B, C)
    ratio: torch.Tensor  # (B, C) or (B, 1)
    is_low_clipped: torch.Tensor | None  # bool, same shape as ratio; None for loss types that do not clip
    is_high_clipped: torch.Tensor | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the loss type's own, token or sequence values


def grpo_per_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    loss_type: str = "grpo",
    params: SurrogateParams | None = None,
    bias_correction_kl: bool = False,
    token_mask: torch.Tensor | None = None,
) -> ObjectiveTerms:
    """L_t = m_t * surrogate_t + beta KL_t, before aggregation over tokens; with the default `grpo` surrogate
    -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    - KL_t is k3 by default (DeepSeekMath eq. 4); `kl_estimator` picks k1 or k2. `bias_correction_kl` multiplies it
      by rho (DeepSeek-V3.2: the unbiased reverse-KL gradient off-policy; it changes the gradient even at rho = 1).
    - m_t, the policy term's mask `token_mask`, `(B, C)` or `(B, 1)`: e.g. `high_entropy_mask`, `off_policy_mask`
      or their product. The KL term is never masked by it.
    - `params` holds every surrogate hyperparameter (`SurrogateParams()`'s defaults when None).
    """
    params = params or SurrogateParams()
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1)
    log_ratio = per_token_logps - old_per_token_logps  # (B, C)
    ratio = torch.exp(
        log_importance_weights(per_token_logps, old_per_token_logps, completion_mask, importance_sampling_level)
    )  # (B, C) or (B, 1)
    surrogate = lookup_loss_type(loss_type).surrogate(
        ratio, log_ratio, per_token_logps, advantages, completion_mask, params
    )
    per_token_loss = surrogate.policy_loss
    if token_mask is not None:
        per_token_loss = per_token_loss * token_mask
    kl = None
    if beta != 0.0:
        kl = per_token_kl(per_token_logps, ref_per_token_logps, kl_estimator)
        if bias_correction_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
    return ObjectiveTerms(
        per_token_loss=per_token_loss,
        per_token_kl=kl,
        ratio=ratio,
        is_low_clipped=surrogate.is_low_clipped,
        is_high_clipped=surrogate.is_high_clipped,
        metrics=surrogate.metrics,
    )


def aggregate_loss(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: str,
    num_sequences: float,
    num_tokens: float,
    max_completion_length: int,
    num_global_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce token losses `(B, C)` to this micro-batch's share of the loss of its optimisation window, by
    `LOSS_TYPES[loss_type].aggregate`. The counts are those of the whole window the gradient is accumulated over;
    `num_global_tokens` (for `dapo`, `cispo`, `vespo`) defaults to `num_tokens`, right for one process."""
    aggregate = lookup_loss_type(loss_type).aggregate
    normalisers = Normalisers(
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        num_global_tokens=num_tokens if num_global_tokens is None else num_global_tokens,
        max_completion_length=max_completion_length,
    )
    return aggregate(per_token_loss * completion_mask, completion_mask, normalisers)


# --- MoE load-balancing term ---


def router_aux_loss_term(aux_loss: torch.Tensor, coef: float, micro_batches: int) -> torch.Tensor:
    """`coef x aux_loss`, the Mixture-of-Experts load-balancing loss (Switch Transformer, arXiv 2101.03961) of one
    micro-batch weighted as in TRL, divided by the `micro_batches` summed into one optimizer step (1 in evaluation):
    the policy loss is already scaled for gradient accumulation, so the window's sum holds the mean of its terms."""
    return coef * aux_loss / micro_batches


# --- Entropy bonus ---


def mean_entropy(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of the entropies over `mask`: the bonus `entropy_coef` weighs, L = L_policy - coef * H, the same
    for every loss type."""
    return (entropies * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class EntropyController:
    """The entropy bonus's coefficient: fixed, or Skywork-OR1's adaptive control (arXiv 2505.22312).

    Adaptive: after each optimizer step, with H the window's token-mean entropy over all processes,
    coef <- min(coef + step, coef_max) if H <= target else max(coef - step, coef_min); the coefficient is applied
    only while the last measured H is <= target (none before the first measurement).
    """

    coef: float
    adaptive: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    step: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf

    def __post_init__(self):
        self._window = None  # entropy sum and token count `(2,)` of the current accumulation window, this process

    @classmethod
    def from_config(cls, args) -> EntropyController:
        return cls(
            args.entropy_coef,
            adaptive=args.use_adaptive_entropy,
            coef_min=args.entropy_coef_min,
            coef_max=args.entropy_coef_max,
            step=args.entropy_coef_delta,
            target=args.entropy_target,
        )

    @property
    def enabled(self) -> bool:
        return self.coef != 0.0 or self.adaptive

    def observe(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one micro-batch's entropies `(B, C)` over `mask` to the window."""
        window = torch.stack([(entropies.detach() * mask).sum(), mask.sum()]).float()  # (2,)
        self._window = window if self._window is None else self._window + window

    def end_window(self, reduce_sum) -> None:
        """At an optimizer step: adapt to the window's token-mean entropy, summed over processes by `reduce_sum`."""
        total, count = reduce_sum(self._window).tolist()
        self.update(total / max(count, 1.0))
        self._window = None

    def applied_coef(self) -> float:
        """The coefficient of the bonus for the current step."""
        if self.adaptive and self.last_entropy > self.target:
            return 0.0
        return self.coef

    def update(self, entropy: float) -> float:
        """Adapt to the window's measured entropy (adaptive mode only); returns the new coefficient."""
        if self.adaptive:
            if entropy <= self.target:
                self.coef = min(self.coef + self.step, self.coef_max)
            else:
                self.coef = max(self.coef - self.step, self.coef_min)
            self.last_entropy = entropy
        return self.coef

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]
