"""speculative.py / drafting.py: drafts from the group change neither greedy completions nor the sampling
distribution; rows accept different numbers of drafts, finished rows leave, the shared prompt cache is used."""

import math

import pytest
import torch
from conftest import group_prompts, processed_distribution
from transformers import GenerationConfig

from grpo_ext import prefix_sharing
from grpo_ext.drafting import DraftMemory, GroupDrafts
from grpo_ext.speculative import DraftStats, accept_drafts, generate_with_drafts, unsupported_reason
from grpo_ext.testing import make_tiny_model

G = 4


def _unpadded(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def _generate(model, prompt_ids, prompt_mask, config):
    return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)[
        :, prompt_ids.size(1) :
    ]


def _uneven_stops(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens=16, **settings):
    """Greedy settings whose stop tokens end the groups after different numbers of tokens."""
    free = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **settings
    )
    completions = _generate(model, prompt_ids, prompt_mask, free)
    stops = {int(completions[0, 2]), int(completions[G, 9])}
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=[tokenizer.eos_token_id, *stops],
        pad_token_id=0,
        **settings,
    )


class _FixedDrafts:
    """A draft source that proposes what `proposals(row, position)` says: a stand-in to force drafts right or wrong."""

    def __init__(self, proposals):
        self.proposals = proposals
        self.lengths = {}

    def propose(self, row, most):
        return self.proposals(row, self.lengths.get(row, 0))[:most]

    def extend(self, row, tokens, drafted=0, accepted=0):
        self.lengths[row] = self.lengths.get(row, 0) + len(tokens)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_greedy_completions_equal_generate(tokenizer, architecture):
    model = make_tiny_model(architecture, tokenizer).eval()
    prompt_ids, prompt_mask = group_prompts(tokenizer)
    config = _uneven_stops(model, tokenizer, prompt_ids, prompt_mask)
    expected = _generate(model, prompt_ids, prompt_mask, config)
    assert len(set((expected != 0).sum(1).tolist())) >= 3  # rows finish at different steps and leave the batch
    stats = DraftStats()
    drafts = GroupDrafts(_unpadded(prompt_ids, prompt_mask), G, num_draft_tokens=4, min_ngram_size=1)
    assert torch.equal(generate_with_drafts(model, prompt_ids, prompt_mask, config, drafts, stats=stats), expected)
    assert stats.drafted > 0 and stats.emitted == int((expected != 0).sum())
    assert stats.forwards <= int((expected != 0).sum(1).max())  # one forward per token at most
    # From a prompt cache prefilled once per group (prefix sharing), too
    cache = prefix_sharing.shared_prompt_cache(model, *prefix_sharing.unique_prompts(prompt_ids, prompt_mask, G), G)
    drafts = GroupDrafts(_unpadded(prompt_ids, prompt_mask), G, num_draft_tokens=4)
    assert torch.equal(generate_with_drafts(model, prompt_ids, prompt_mask, config, drafts, cache=cache), expected)


def test_ragged_acceptance_right_and_wrong_drafts(tokenizer):
    """Drafts that are always right (each row proposing a different number, so rows accept 1..4 tokens a forward)
    and drafts that are always wrong (nothing accepted) give the same completions; the forwards follow."""
    model = make_tiny_model("qwen2", tokenizer).eval()
    prompt_ids, prompt_mask = group_prompts(tokenizer)
    config = _uneven_stops(model, tokenizer, prompt_ids, prompt_mask)
    expected = _generate(model, prompt_ids, prompt_mask, config)
    lengths = (expected != 0).sum(1).tolist()

    right = _FixedDrafts(lambda row, at: expected[row, at : min(at + 1 + row % 4, lengths[row])].tolist())
    stats = DraftStats()
    assert torch.equal(generate_with_drafts(model, prompt_ids, prompt_mask, config, right, stats=stats), expected)
    assert stats.accepted == stats.drafted > 0
    # Row r emits 2 + r % 4 tokens per forward (its drafts and one more): the longest-running row sets the count
    assert stats.forwards == max(math.ceil(length / (2 + row % 4)) for row, length in enumerate(lengths))

    vocab = model.config.vocab_size
    wrong = _FixedDrafts(lambda row, at: ((expected[row, at : min(at + 3, lengths[row])] + 1) % vocab).tolist())
    stats = DraftStats()
    assert torch.equal(generate_with_drafts(model, prompt_ids, prompt_mask, config, wrong, stats=stats), expected)
    assert stats.accepted == 0 and stats.drafted > 0 and stats.forwards == max(lengths)


def test_token_reading_rules_and_all_rows_to_the_limit(tokenizer):
    """Processors that read the tokens before each position (repetition penalty, min_new_tokens) see the accepted
    drafts; completions that never stop run to max_new_tokens."""
    model = make_tiny_model("llama", tokenizer).eval()
    prompt_ids, prompt_mask = group_prompts(tokenizer)
    config = _uneven_stops(model, tokenizer, prompt_ids, prompt_mask, repetition_penalty=1.5)
    config.min_new_tokens = 5
    expected = _generate(model, prompt_ids, prompt_mask, config)
    drafts = GroupDrafts(_unpadded(prompt_ids, prompt_mask), G, num_draft_tokens=3, ngram_size=2, min_ngram_size=1)
    assert torch.equal(generate_with_drafts(model, prompt_ids, prompt_mask, config, drafts), expected)

    config = GenerationConfig(do_sample=False, max_new_tokens=7, eos_token_id=[tokenizer.eos_token_id], pad_token_id=0)
    expected = _generate(model, prompt_ids, prompt_mask, config)
    drafts = GroupDrafts(_unpadded(prompt_ids, prompt_mask), G, num_draft_tokens=4, min_ngram_size=1)
    assert torch.equal(generate_with_drafts(model, prompt_ids, prompt_mask, config, drafts), expected)


@pytest.mark.parametrize("penalty", [1.3, 1.0], ids=["token-reading processors", "score-only processors"])
def test_sampled_tokens_follow_the_model_distribution(tokenizer, penalty):
    """Three-token completions of one prompt with drafts forced in: even rows draft two tokens (a likely pair), odd
    rows one (another token), so acceptance is ragged, and some rows stop after one token. The frequency of every
    (first, second) pair matches the exact probability (chi-square, fixed seed)."""
    model = make_tiny_model("qwen2", tokenizer).eval()
    prompt = tokenizer(["12+34="], return_tensors="pt")["input_ids"]  # (1, P)
    temperature, top_k = 0.7, 6

    def distribution(sequence):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
        return processed_distribution(logits, sequence, penalty, temperature, top_k)

    first = distribution(prompt[0].tolist())
    candidates = first.argsort(descending=True)[:top_k].tolist()  # the top-k first tokens, most likely first
    stops = candidates[4:]  # the two least likely end the completion
    expected = {(t,): first[t].item() for t in stops}
    seconds = {}
    for t in candidates[:4]:
        seconds[t] = distribution(prompt[0].tolist() + [t])
        expected.update({(t, u): first[t].item() * seconds[t][u].item() for u in seconds[t].nonzero().squeeze(1)})
    expected = {tuple(int(x) for x in key): p for key, p in expected.items()}
    likely_pair = [candidates[0], int(seconds[candidates[0]].argmax())]
    drafts = _FixedDrafts(lambda row, at: (likely_pair if row % 2 == 0 else [candidates[1]]) if at == 0 else [])
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0, repetition_penalty=penalty,
        max_new_tokens=3, eos_token_id=stops, pad_token_id=0,
    )  # fmt: skip
    samples = 4000
    torch.manual_seed(0)
    stats = DraftStats()
    completions = generate_with_drafts(
        model, prompt.repeat(samples, 1), torch.ones(samples, prompt.size(1)), config, drafts, stats=stats
    )
    assert 0 < stats.accepted < stats.drafted
    counts = {}
    for row in completions.tolist():
        key = (row[0],) if row[0] in stops else tuple(row[:2])
        assert row[0] not in stops or row[1:] == [0, 0]  # padded after the stop token
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(expected)  # nothing outside the processed distribution's support
    cells = [key for key in expected if expected[key] * samples >= 5]  # chi-square over well-filled cells
    rest = samples - sum(counts.get(key, 0) for key in cells)
    rest_expected = samples * (1 - sum(expected[key] for key in cells))
    statistic = sum((counts.get(k, 0) - samples * expected[k]) ** 2 / (samples * expected[k]) for k in cells)
    statistic += (rest - rest_expected) ** 2 / max(rest_expected, 1.0)
    degrees = len(cells)  # cells + the rest, minus one
    z = 3.09  # 99.9th percentile of chi-square with `degrees` degrees of freedom (Wilson-Hilferty)
    limit = degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3
    assert statistic < limit, (statistic, limit, degrees)


def test_accept_drafts_rule():
    """Greedy: drafts accepted while they are the argmax, then the argmax; a row without drafts takes the argmax.
    Sampled: a draft with probability 1 is always accepted, one with probability 0 never, and the token drawn after
    a rejection is never the rejected draft."""
    scores = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]]).repeat(3, 1, 1)  # (3, 3, V=3)
    drafts = torch.tensor([[1, 2], [1, 0], [2, 2]])  # right-right, right-wrong, wrong
    accepted, next_ids = accept_drafts(scores, drafts, torch.tensor([2, 2, 2]), do_sample=False)
    assert accepted.tolist() == [2, 1, 0] and next_ids.tolist() == [0, 2, 1]
    accepted, next_ids = accept_drafts(scores, drafts, torch.tensor([1, 0, 2]), do_sample=False)
    assert accepted.tolist() == [1, 0, 0] and next_ids.tolist() == [2, 1, 1]

    certain = torch.full((500, 2, 3), -math.inf)
    certain[:, 0, 1] = 0.0  # position 0: token 1 with probability 1
    certain[:, 1, :2] = 0.0  # position 1: tokens 0 and 1, each 1/2
    accepted, next_ids = accept_drafts(certain, torch.ones(500, 1, dtype=torch.long), torch.ones(500), True)
    assert accepted.eq(1).all() and set(next_ids.tolist()) == {0, 1}
    impossible = torch.zeros(500, 1, dtype=torch.long).fill_(2)  # probability 0 at position 0
    accepted, next_ids = accept_drafts(certain, impossible, torch.ones(500), True)
    assert accepted.eq(0).all() and next_ids.eq(1).all()
    halves = torch.zeros(4000, 1, 3)
    halves[:, 0, 2] = -math.inf  # tokens 0 and 1, each 1/2; the draft is 0
    accepted, next_ids = accept_drafts(
        torch.cat([halves, halves], 1), torch.zeros(4000, 1, dtype=torch.long), torch.ones(4000), True
    )
    rejected = accepted.eq(0)
    assert next_ids[rejected].eq(1).all() and 0.45 < rejected.float().mean() < 0.55


def test_group_drafts_sources():
    """Drafts come from the prompt, the other completions of the group and earlier rollouts, longest n-gram first;
    never from another group, never past `most`, never the row's own tail."""
    prompts = [[1, 2, 3, 4, 5]] * 2 + [[9, 9]] * 2
    drafts = GroupDrafts(prompts, num_generations=2, num_draft_tokens=3, ngram_size=2)
    assert drafts.propose(0, 3) == []  # the prompt's tail is followed by nothing yet
    drafts.extend(0, [2, 3])
    assert drafts.propose(0, 3) == [4, 5]  # "2 3" in the prompt was followed by 4 5
    assert drafts.propose(0, 1) == [4]
    drafts.extend(1, [7, 2, 3, 8, 6])
    drafts.extend(0, [7, 2])
    assert drafts.propose(0, 3) == [3, 8, 6]  # "7 2" in row 1's completion: the sibling's text
    drafts.extend(2, [7, 2])
    assert drafts.propose(2, 3) == []  # row 2 is another group: it sees neither group 0's prompt nor completions

    memory = DraftMemory(max_prompts=1, per_prompt=2)
    drafts.remember(memory)
    assert memory.recall([1, 2, 3, 4, 5]) == []  # one prompt kept: the later group's
    assert memory.recall([9, 9]) == [(7, 2)]  # its completions that have tokens
    later = GroupDrafts([[9, 9]] * 2, num_generations=2, num_draft_tokens=4, memory=memory)
    later.extend(0, [7])
    assert later.propose(0, 4) == [2]  # from the earlier rollout of the same prompt
    memory.remember([5], [[1, 2]])
    assert len(memory) == 1 and memory.recall([9, 9]) == []  # the least recently used prompt is forgotten


def test_unsupported_models_are_named(tokenizer):
    assert unsupported_reason(make_tiny_model("qwen2", tokenizer)) is None
    assert "DynamicSlidingWindowLayer" in unsupported_reason(make_tiny_model("gemma3", tokenizer))
    assert "LinearAttention" in unsupported_reason(make_tiny_model("qwen3_5", tokenizer))
    eager = make_tiny_model("qwen2", tokenizer)
    eager.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(eager)


def test_trainer_rollout_with_drafts_equals_plain(greedy_training_step):
    """Greedy rollouts of the trainer: the same completions, rewards and loss with drafts as without; the acceptance
    is logged and the completions are remembered as drafts for the next epoch."""
    (drafted, drafted_log, drafting), (plain, plain_log, plain_trainer) = (
        greedy_training_step(speculative_draft_tokens=k, max_completion_length=12) for k in (4, 0)
    )
    memory, no_memory = drafting.rollout_engine.draft_memory, plain_trainer.rollout_engine.draft_memory
    assert torch.equal(drafted.completion_ids, plain.completion_ids) and drafted.completion_mask.sum() > 0
    for key in ("loss", "reward", "completions/mean_length"):
        assert drafted_log[key] == pytest.approx(plain_log[key], rel=1e-5, abs=1e-7), key
    assert 0 < drafted_log["speculative/acceptance_rate"] <= 1
    assert drafted_log["speculative/tokens_per_forward"] > 1
    assert "speculative/acceptance_rate" not in plain_log and no_memory is None
    assert len(memory) == 2  # the step's two prompts


def test_proposal_length_follows_acceptance_and_short_matches_propose_nothing():
    """Two more tokens after a forward that accepted all its drafts, one fewer after a rejection (between 1 and
    num_draft_tokens); a one-token match proposes nothing by default."""
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]] * 2
    drafts = GroupDrafts(prompts, num_generations=2, num_draft_tokens=5, ngram_size=2)
    assert drafts.propose(0, 9) == [3, 4, 5, 6, 7]  # "1 2" occurred before: what followed it
    drafts.extend(0, [3, 4], drafted=5, accepted=1)
    assert drafts.draft_lengths[0] == 4 and drafts.propose(0, 9) == [5, 6, 7, 8]
    for _ in range(4):
        drafts.extend(0, [], drafted=1, accepted=0)
    assert drafts.draft_lengths[0] == 1  # never below one
    drafts.extend(0, [5, 6], drafted=1, accepted=1)
    drafts.extend(0, [7, 8], drafted=3, accepted=3)
    assert drafts.draft_lengths[0] == 5  # up again, at most num_draft_tokens
    assert drafts.draft_lengths[1] == 5  # another row's length is its own
    drafts.extend(1, [9])
    assert drafts.propose(1, 9) == []  # "2 9" never occurred; "9" alone is too short a match
    one_token = GroupDrafts(prompts, 2, 5, ngram_size=2, min_ngram_size=1)
    one_token.extend(1, [9])
    assert one_token.propose(1, 9) == [1, 2]  # what followed "9" in the prompt


def test_task_evaluation_drafts_from_the_previous_evaluations_answers(tokenizer, make_args, monkeypatch):
    """The greedy answers of the task metrics: the first evaluation's are remembered, the second drafts from them
    (nearly every draft accepted: the policy did not change) and gives the same answers as without drafts."""
    from conftest import tiny_trainer

    from grpo_ext import speculative
    from grpo_ext.testing import make_prompt_dataset

    calls = []
    plain_call = speculative.generate_with_drafts

    def recorded(*args, **kwargs):
        calls.append(kwargs["stats"])
        return plain_call(*args, **kwargs)

    def starts_with_digit(prompts, completions, completion_ids, **kwargs):
        seen.append([list(ids) for ids in completion_ids])
        return [1.0 if c[:1].isdigit() else 0.0 for c in completions]

    monkeypatch.setattr(speculative, "generate_with_drafts", recorded)
    eval_set = make_prompt_dataset(6, seed=3)
    answers = {}
    for draft_tokens in (4, 0):
        seen = []
        args = make_args(
            eval_reward_funcs=["starts_with_digit"], eval_task_metrics_only=True, per_device_eval_batch_size=3,
            eval_speculative_draft_tokens=draft_tokens, max_completion_length=16,
        )  # fmt: skip
        trainer = tiny_trainer(tokenizer, args, reward_funcs=starts_with_digit, eval_dataset=eval_set)
        trainer.evaluate()
        trainer.evaluate()
        answers[draft_tokens] = seen
    assert answers[4][0] == answers[4][1] == answers[0][0] == answers[0][1]
    assert len(calls) == 4  # two batches of 3 problems per evaluation, with drafts only
    first, second = calls[:2], calls[2:]
    assert sum(s.accepted for s in second) > 0.9 * sum(s.drafted for s in second) > 0
    assert sum(s.forwards for s in second) < sum(s.forwards for s in first)


def test_a_4bit_model_with_lora_drafts_the_same_greedy_completions(tokenizer, tmp_path):
    """QLoRA, this project's main use: an NF4 base with a LoRA adapter decodes the same tokens with drafts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from grpo_ext.models import four_bit_config
    from grpo_ext.rollout import GenerationPlan, generate_completions
    from grpo_ext.testing import save_tiny_model

    save_tiny_model(tmp_path, "qwen2", hidden_size=64)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=four_bit_config(torch.float32), dtype=torch.float32
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).eval()
    prompt_ids, prompt_mask = group_prompts(tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    plain = generate_completions(model, prompt_ids, prompt_mask, G, config, GenerationPlan(True, True, True))
    stats = DraftStats()
    drafting = GenerationPlan(True, True, True, draft_tokens=4)
    assert torch.equal(generate_completions(model, prompt_ids, prompt_mask, G, config, drafting, None, stats), plain)
    assert stats.accepted > 0
