"""Where speculative decoding's drafts come from: the group.

A general-purpose speculative decoder needs a draft model. GRPO has a draft source no general decoder has: the G
completions of one prompt are written at the same time, from the same prompt, and often say the same things (the
same reasoning steps, the same numbers copied from the prompt, the same answer line); an earlier epoch wrote
completions of this very prompt too. `GroupDrafts` proposes the next tokens of a row by n-gram lookup (prompt lookup
decoding, widened to the group): it takes the row's last `ngram_size` tokens (then fewer, down to one), finds where
they last occurred in

- the prompt,
- the completions of the same group generated so far (the row's own included),
- completions of the same prompt remembered from earlier rollouts (`DraftMemory`, bounded),

and proposes the tokens that followed there. A match shorter than `min_ngram_size` (2) proposes nothing: a single
token recurs everywhere and predicts little. How many tokens a row is proposed adapts to how its drafts fare, as
transformers' assisted generation does: two more after a forward that accepted them all, one fewer after a
rejection, between 1 and `num_draft_tokens`. A proposal costs a few dict lookups per row: the n-grams of every source
are indexed as their tokens arrive. The policy then verifies the proposal
(`speculative.py`), so a wrong draft costs compute, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict


class DraftMemory:
    """Completions of earlier rollouts, by prompt: the last `per_prompt` completions of at most `max_prompts` prompts
    (the least recently used prompt forgotten first), as token tuples."""

    def __init__(self, max_prompts: int, per_prompt: int = 16):
        self.max_prompts = max_prompts
        self.per_prompt = per_prompt
        self._completions: OrderedDict[tuple[int, ...], list[tuple[int, ...]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._completions)

    def recall(self, prompt: list[int]) -> list[tuple[int, ...]]:
        key = tuple(prompt)
        if key not in self._completions:
            return []
        self._completions.move_to_end(key)
        return self._completions[key]

    def remember(self, prompt: list[int], completions: list[list[int]]) -> None:
        if self.max_prompts <= 0:
            return
        key = tuple(prompt)
        kept = [tuple(completion) for completion in completions if completion][-self.per_prompt :]
        if not kept:
            return
        self._completions[key] = kept
        self._completions.move_to_end(key)
        while len(self._completions) > self.max_prompts:
            self._completions.popitem(last=False)


class GroupDrafts:
    """Draft proposals for the rows of one decoding batch: `prompts[i]` is row i's prompt (unpadded token list), rows
    `i` with the same `i // num_generations` form a group; `memory` supplies earlier completions of each prompt."""

    def __init__(
        self,
        prompts: list[list[int]],
        num_generations: int,
        num_draft_tokens: int,
        ngram_size: int = 3,
        memory: DraftMemory | None = None,
        min_ngram_size: int = 2,
    ):
        self.num_draft_tokens = num_draft_tokens
        self.ngram_size = ngram_size
        self.min_ngram_size = min(min_ngram_size, ngram_size)
        self.draft_lengths = [num_draft_tokens] * len(prompts)  # each row's current proposal length
        self.num_generations = num_generations
        self.prompts = prompts
        # Each row's text as a source: the prompt's last tokens, so that a completion's first tokens follow an
        # n-gram too, then the tokens the row has emitted
        self._texts: list[list[int]] = [list(prompt[-ngram_size:]) for prompt in prompts]
        # Per group: n-gram (tuple) -> its occurrences (source, index of its last token), oldest first
        self._index: list[dict[tuple[int, ...], list[tuple[list[int], int]]]] = []
        self._prompt_sources: list[list[int]] = []  # per group: its prompt as a source
        for start in range(0, len(prompts), num_generations):
            self._index.append({})
            self._prompt_sources.append(list(prompts[start]))
            self._add(start // num_generations, self._prompt_sources[-1], 0)
            tail = prompts[start][-ngram_size:]
            for completion in memory.recall(prompts[start]) if memory is not None else []:
                self._add(start // num_generations, tail + list(completion), len(tail) - 1)
        for row, text in enumerate(self._texts):  # what follows the prompt's tail: each row's first tokens
            self._add(row // num_generations, text, len(text) - 1)

    @property
    def completions(self) -> list[list[int]]:
        """The tokens each row has emitted."""
        return [text[len(prompt[-self.ngram_size :]) :] for text, prompt in zip(self._texts, self.prompts, strict=True)]

    def _add(self, group: int, source: list[int], start: int) -> None:
        """Index the n-grams of `source` that end at positions `start` onwards."""
        index = self._index[group]
        for end in range(start, len(source)):
            for n in range(1, min(self.ngram_size, end + 1) + 1):
                index.setdefault(tuple(source[end - n + 1 : end + 1]), []).append((source, end))

    def extend(self, row: int, tokens: list[int], drafted: int = 0, accepted: int = 0) -> None:
        """Row `row` emitted `tokens` (`accepted` of its `drafted` draft tokens among them): they become part of its
        context and a source for its group, and its proposal length follows the acceptance."""
        if drafted:
            grown = self.draft_lengths[row] + 2 if accepted == drafted else self.draft_lengths[row] - 1
            self.draft_lengths[row] = min(max(grown, 1), self.num_draft_tokens)
        text = self._texts[row]
        start = len(text)
        text.extend(tokens)
        self._add(row // self.num_generations, text, start)

    def propose(self, row: int, most: int) -> list[int]:
        """Up to `most` tokens (and the row's proposal length) that may follow row `row`'s context. The longest
        matching n-gram wins; among its occurrences, one at the same place of another completion of the prompt (a
        sibling or an earlier rollout's: they often run in step), then the longest continuation, then the newest."""
        most = min(most, self.draft_lengths[row])
        if most <= 0:
            return []
        text = self._texts[row]
        context_tail = text[-self.ngram_size :]
        group = row // self.num_generations
        index, prompt_source = self._index[group], self._prompt_sources[group]
        for n in range(len(context_tail), self.min_ngram_size - 1, -1):
            best, best_rank = [], (False, 0)
            for source, end in reversed(index.get(tuple(context_tail[-n:]), ())):  # newest first
                following = source[end + 1 : end + 1 + most]  # empty at the row's own tail
                rank = (source is not prompt_source and end == len(text) - 1, len(following))
                if following and rank > best_rank:
                    best, best_rank = following, rank
                    if rank == (True, most):
                        break
            if best:
                return best
        return []

    def remember(self, memory: DraftMemory) -> None:
        """Keep each group's completions as drafts for its prompt's next rollout."""
        completions = self.completions
        for start in range(0, len(self.prompts), self.num_generations):
            memory.remember(self.prompts[start], completions[start : start + self.num_generations])
