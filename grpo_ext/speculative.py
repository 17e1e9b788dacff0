"""Speculative decoding with drafts from the group, verified by the policy itself.

Each decoding forward feeds, for every row still going, its pending token and up to k draft tokens that the group
proposes (`drafting.GroupDrafts`): one forward scores the k + 1 positions. Position j's logits go through the same
logits processors as in `generate` (`decoding.prepare_decoding`), with the row's tokens and the drafts before j as
their input. The drafts are then accepted from the left by the standard speculative-sampling rule for a
deterministic proposal (the draft is a point mass q = 1 at token x): accept x with probability p(x); at the first
rejection draw from p with x removed, renormalised, (p - q)+ / |p - q|+; when all are accepted draw one more token
from the next position's p. The emitted token then has exactly the probability p, whatever the draft: sampled
completions follow the same distribution as plain decoding, and without sampling (accept x iff it is the argmax, else
the argmax) the completions are token for token the same. A row emits between 1 and k + 1 tokens per forward.

Rows accept different numbers of tokens (ragged): every row keeps all k + 1 key/value entries of the block it was fed
and the attention mask marks the rejected and unused ones as holes, with the position ids counting only real tokens,
so no row waits for another; trailing columns that no row uses are cropped from the cache. Finished rows leave the
batch and its cache as in `decoding.generate_dropping_finished`, and a prompt cache prefilled once per group (prefix
sharing) is used as is. Holes need attention that masks any key column: full-attention `DynamicLayer` caches with
eager or SDPA attention (`unsupported_reason` names the rest: sliding windows, recurrent states, other kernels).

What it saves is decoding forwards; what it costs is a forward over k + 1 positions instead of one, and the rejected
drafts' positions in the cache. On a GPU a forward over a few more positions costs about the same as one (decoding
is bound by reading the weights); on a CPU it costs more, so it pays only when many drafts are accepted (measured in
benchmarks/README.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerationConfig,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import cache_rows
from .decoding import prepare_decoding
from .drafting import GroupDrafts
from .models import unwrap_causal_lm

# Processors that read only the scores, not the tokens before them: one call serves every position of every row.
_SCORE_ONLY = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)
_MASKED_ATTENTION = ("eager", "sdpa")
_WARNED: set[str] = set()


def warn_plain_decoding(reason: str) -> None:
    """Announce once per process why this run decodes without drafts."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"speculative_draft_tokens is set but drafts are not used: {reason}", stacklevel=3)


@dataclass
class DraftStats:
    """What drafting did in decoding calls: forwards run, rows fed to them, tokens drafted, accepted and emitted."""

    forwards: int = 0
    row_forwards: int = 0  # the rows of each forward, summed (what plain decoding would emit)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a row emits per forward it is fed to (1.0 without drafts)."""
        return self.emitted / self.row_forwards if self.row_forwards else 0.0


def unsupported_reason(model: nn.Module) -> str | None:
    """Why a KV cache with holes (the rejected drafts of a ragged batch) cannot serve this model, or None. Asked
    after `decoding.unsupported_reason` accepted the generation config."""
    causal_lm = unwrap_causal_lm(model)
    attention = getattr(causal_lm.config, "_attn_implementation", None) or "eager"
    if attention not in _MASKED_ATTENTION:
        return f"attn_implementation={attention!r}: drafting is verified with {' / '.join(_MASKED_ATTENTION)} only"
    for layer in DynamicCache(config=causal_lm.config).layers:
        if type(layer) is not DynamicLayer:
            return f"{type(layer).__name__} cache layers: drafting needs full-attention layers (holes in the cache)"
    return None


def accept_drafts(
    scores: torch.Tensor, draft_ids: torch.Tensor, draft_lengths: torch.Tensor, do_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule for deterministic drafts. `scores` `(b, k + 1, V)`: processed scores at each
    position (the pending token's, then after each draft), `draft_ids` `(b, k)` with `draft_lengths` `(b,)` real ones.
    Returns the number of drafts accepted `(b,)` and the token emitted after them `(b,)`."""
    k = draft_ids.size(1)
    rows = torch.arange(scores.size(0), device=scores.device)  # (b,)
    real = torch.arange(k, device=scores.device) < draft_lengths[:, None]  # (b, k)
    if do_sample:
        probs = torch.softmax(scores, dim=-1)  # (b, k + 1, V)
        draft_probs = probs[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1)  # (b, k): p(x) of each draft
        accepted = (torch.rand_like(draft_probs) < draft_probs) & real  # (b, k): accept x with probability p(x)
    else:
        accepted = (scores[:, :k].argmax(-1) == draft_ids) & real  # (b, k)
    num_accepted = accepted.long().cumprod(-1).sum(-1)  # (b,): drafts accepted before the first rejection
    if not do_sample:
        return num_accepted, scores[rows, num_accepted].argmax(-1)
    next_probs = probs[rows, num_accepted]  # (b, V): p at the first position not accepted
    rejected = num_accepted < draft_lengths  # (b,): a draft was rejected there (else every draft was accepted)
    rejected_ids = draft_ids.gather(1, num_accepted.clamp(max=max(k - 1, 0))[:, None]) if k else None  # (b, 1)
    if k:  # (p - q)+ with q the point mass at the rejected draft: p without that token
        removed = next_probs.scatter(1, rejected_ids, 0.0)
        next_probs = torch.where(rejected[:, None], removed, next_probs)
    return num_accepted, torch.multinomial(next_probs, num_samples=1).squeeze(1)


def _processed_scores(processors, score_only, sequences, lengths, draft_ids, logits) -> torch.Tensor:
    """The processed scores `(b, k + 1, V)` of `logits` `(b, k + 1, V)`: position j's processors see the row's tokens
    `sequences[:, : lengths]` (left-padded prompt and completion so far) followed by its first j drafts."""
    b, positions, vocab = logits.shape
    if score_only:
        flat = logits.reshape(b * positions, vocab)
        return processors(sequences.new_zeros(b * positions, 1), flat).reshape(b, positions, vocab)
    scores = torch.empty_like(logits)
    for length in lengths.unique().tolist():  # rows of one length share a rectangular input
        same = (lengths == length).nonzero().squeeze(1)  # (g,)
        seen = sequences[same, :length]  # (g, length)
        for j in range(positions):
            inputs = torch.cat([seen, draft_ids[same, :j]], dim=1)  # (g, length + j)
            scores[same, j] = processors(inputs, logits[same, j])
    return scores


@torch.no_grad()
def generate_with_drafts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation_config: GenerationConfig,
    drafts: GroupDrafts,
    cache: Cache | None = None,
    stats: DraftStats | None = None,
) -> torch.Tensor:
    """Completion ids `(B, C)` of the left-padded prompts `(B, P)`, padded after each row's stop token, as
    `decoding.generate_dropping_finished` returns them; `drafts` proposes each row's next tokens (row i of the batch
    is row i of `drafts`). `cache`: a KV cache holding all but the last token of every prompt, or None to prefill.
    `stats` (optional) is filled with the forwards run and the drafts accepted."""
    setup = prepare_decoding(model, input_ids, generation_config)
    config, processors, stop_ids, pad_id = setup.config, setup.processors, setup.stop_ids, setup.pad_id
    score_only = all(isinstance(processor, _SCORE_ONLY) for processor in processors)
    causal_lm = unwrap_causal_lm(model)
    stats = stats if stats is not None else DraftStats()
    max_new = config.max_new_tokens
    batch, prompt_length = input_ids.shape
    device = input_ids.device

    completions = input_ids.new_full((batch, max_new), pad_id)  # (B, max_new)
    lengths = input_ids.new_zeros(batch)  # (B,): tokens emitted by each row
    rows = torch.arange(batch, device=device)  # (b,) batch index of each row still going
    # What the processors see: the left-padded prompt, then the row's tokens; room for the last block's overshoot
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new), pad_id)], dim=1)  # (b, P + max_new)
    if cache is None:  # prefill with the first forward: the whole prompt is pending
        cache = DynamicCache(config=causal_lm.config)
        pending, mask = input_ids, attention_mask  # (B, P) each
    else:  # the cache holds all but the last prompt token
        pending, mask = input_ids[:, -1:], attention_mask  # (B, 1), (B, P)
    while True:
        proposals = [drafts.propose(int(row), max_new - int(lengths[row]) - 1) for row in rows]
        draft_lengths = torch.tensor([len(p) for p in proposals], device=device)  # (b,)
        k = int(draft_lengths.max()) if len(proposals) else 0
        draft_ids = input_ids.new_full((rows.size(0), k), pad_id)  # (b, k)
        for i, proposal in enumerate(proposals):
            draft_ids[i, : len(proposal)] = torch.tensor(proposal, dtype=draft_ids.dtype)
        drafted = torch.arange(k, device=device) < draft_lengths[:, None]  # (b, k)
        mask = torch.cat([mask, drafted.to(mask.dtype)], dim=1)  # (b, columns): cache + pending + drafts
        step_ids = torch.cat([pending, draft_ids], dim=1)  # (b, n + k)
        step_positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.size(1) :]  # (b, n + k): real tokens only
        keep = {"logits_to_keep": k + 1} if setup.keeps_logits else {}
        logits = (
            model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                cache=cache,
                use_cache=True,
                **keep,
                **setup.forward_kwargs,
            )
            .logits[:, -(k + 1) :]
            .float()
        )  # (b, k + 1, V)
        scores = _processed_scores(processors, score_only, sequences, prompt_length + lengths[rows], draft_ids, logits)
        num_accepted, next_ids = accept_drafts(scores, draft_ids, draft_lengths, config.do_sample)  # (b,) each
        stats.forwards += 1
        stats.row_forwards += rows.size(0)
        stats.drafted += int(draft_lengths.sum())
        stats.accepted += int(num_accepted.sum())

        # Emitted tokens `(b, k + 1)`: the accepted drafts, then the drawn token, cut after a stop token
        emitted = torch.cat([draft_ids, draft_ids.new_full((rows.size(0), 1), pad_id)], dim=1)  # (b, k + 1)
        emitted[torch.arange(rows.size(0), device=device), num_accepted] = next_ids
        count = num_accepted + 1  # (b,)
        is_stop = torch.isin(emitted, stop_ids) & (torch.arange(k + 1, device=device) < count[:, None])  # (b, k + 1)
        stopped = is_stop.any(-1)  # (b,)
        count = torch.where(stopped, is_stop.long().argmax(-1) + 1, count)  # up to and including the first stop
        for i, row in enumerate(rows.tolist()):  # ragged writes: a few rows, at most k + 1 tokens each
            n, start = int(count[i]), int(lengths[row])
            tokens = emitted[i, :n]
            completions[row, start : start + n] = tokens
            sequences[i, prompt_length + start : prompt_length + start + n] = tokens
            drafts.extend(row, tokens.tolist(), int(draft_lengths[i]), int(num_accepted[i]))
        lengths[rows] += count
        stats.emitted += int(count.sum())

        # The block's key/value entries stay; the rejected drafts' become holes. The drawn token is pending.
        if k:
            mask[:, -k:] = (torch.arange(k, device=device) < num_accepted[:, None]).to(mask.dtype)
        finished = stopped | (lengths[rows] >= max_new)  # (b,)
        if bool(finished.all()):
            break
        if bool(finished.any()):  # drop the finished rows from the batch and from every cache layer
            going = (~finished).nonzero().squeeze(1)  # (b',)
            rows, next_ids, sequences, mask = rows[going], next_ids[going], sequences[going], mask[going]
            cache_rows.take_rows(cache, going)
        used = mask.any(0).nonzero()  # trailing columns no row uses leave the cache
        width = int(used.max()) + 1 if used.numel() else 0
        if width < mask.size(1):
            cache.crop(width - mask.size(1))  # a negative count: the tokens removed
            mask = mask[:, :width]
        pending = next_ids[:, None]  # (b, 1)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)  # (b, columns + 1)
    return completions[:, : int(lengths.max())]
