"""Accuracy of a policy on a dataset split: pass@1 (greedy) and maj@k (majority vote over k samples).

Used by `recipes/evaluate.py` and by the training recipe before and after training (DeepSeekMath reports greedy
top-1 accuracy and maj@64; arXiv 2402.03300, section 4.2).
"""

from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm

from .moe import without_router_logits
from .rollout import completion_mask_after_eos, eos_token_ids, prompt_texts


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, batch_size=32):
    """`num_samples` completions (greedy when 1) for each prompt: a list of lists of strings."""
    model.eval()
    stop_ids = eos_token_ids(model, tokenizer)  # the same stop rule as training rollouts
    device = next(model.parameters()).device
    texts = prompt_texts(list(prompts), tokenizer)
    completions = []
    for start in tqdm(range(0, len(texts), batch_size), desc="Evaluating", unit="batch"):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(device)
        sampled = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=num_samples > 1,
            temperature=temperature if num_samples > 1 else None,
            top_p=None,
            top_k=None,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            **without_router_logits(model),
        )
        completion_ids = sampled[:, batch["input_ids"].size(1) :]  # (b * k, C)
        mask, _ = completion_mask_after_eos(completion_ids, stop_ids)
        decoded = tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(completion_ids, mask)], skip_special_tokens=True
        )
        completions += [decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples)]
    return completions


def evaluate_accuracy(
    model,
    tokenizer,
    dataset,
    num_samples=1,
    max_new_tokens=256,
    temperature=1.0,
    batch_size=32,
    answer_key=None,
    reward_funcs: dict | None = None,
) -> dict:
    """`{"pass@1": ..., "maj@k": ..., "num_problems": n}` on a dataset with `prompt` and `answer` columns.

    With num_samples == 1, pass@1 is greedy accuracy; with k > 1 it is the mean accuracy of the k samples and
    maj@k scores the most frequent final answer (`answer_key`: text -> hashable, groups equal answers for the vote).
    `reward_funcs` (name -> reward function returning 1.0 for a correct completion) choose the metric: the first one
    gives pass@1 and maj@k, and each one its own `pass@1/<name>`. The default is `reward_models.accuracy_reward`
    (math-verify).
    """
    from reward_models.accuracy import accuracy_reward, extract_answer

    reward_funcs = reward_funcs or {"accuracy": accuracy_reward}
    answer_key = answer_key or (lambda text: (extract_answer(text) or "").strip())
    completions = generate_completions(
        model, tokenizer, dataset["prompt"], num_samples, max_new_tokens, temperature, batch_size
    )
    # The majority vote does not depend on the metric: per problem, the first sample that gives the winning answer
    voted = []
    for samples in completions:
        keys = [answer_key(text) for text in samples]
        voted.append(keys.index(Counter(keys).most_common(1)[0][0]))
    n = max(len(completions), 1)
    results = {}
    for name, reward_func in reward_funcs.items():
        pass_scores, majority_scores = [], []
        for samples, gold, winner in zip(completions, dataset["answer"], voted):
            scores = [score or 0.0 for score in reward_func(samples, answer=[gold] * len(samples))]
            pass_scores.append(sum(scores) / len(scores))
            majority_scores.append(scores[winner])
        if not results:
            results = {"pass@1": sum(pass_scores) / n, f"maj@{num_samples}": sum(majority_scores) / n}
        results[f"pass@1/{name}"] = sum(pass_scores) / n
    return {**results, "num_problems": len(completions)}
