"""Does an exported GGUF file run in llama.cpp as it runs in transformers? llama.cpp is the file's real consumer.

    make llama-cpp-check        # builds llama-cpp-python once (a few minutes), then checks outputs/smollm2/export
    python benchmarks/llama_cpp_check.py --gguf outputs/smollm2/export/gguf/model-q8_0.gguf \
        --dataset outputs/smollm2/data/test.jsonl --instruction "End your reply with 'Answer: <number>'."

On each held-out problem, the same prompt (rendered by the chat template the file carries) is answered greedily by
llama.cpp (llama-cpp-python) and by transformers' GGUF loader (the file dequantised, grpo-ext's rollout engine);
both are scored with the task metrics, and the two runs compared: prompt tokens (llama.cpp's tokenizer from the
file's metadata against the transformers tokenizer), answers token for token, and llama.cpp's own chat formatting
(`create_chat_completion`, the template read from the file) against the prompt rendered here. Not part of the test
suite: llama-cpp-python is a source build.
"""

import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default="outputs/smollm2/export/gguf/model-q8_0.gguf")
    parser.add_argument("--dataset", default="outputs/smollm2/data/test.jsonl")
    parser.add_argument("--instruction", default="End your reply with 'Answer: <number>'.")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--reward_funcs", nargs="+", default=["answer_line", "accuracy"])
    parser.add_argument("--output", default=None, help="Write the summary JSON here too.")
    cli = parser.parse_args()

    from llama_cpp import Llama
    from transformers import AutoTokenizer, GenerationConfig

    from grpo_ext.cpu import set_torch_threads, usable_cores
    from grpo_ext.data import load_split, to_prompt_answer
    from grpo_ext.engine import RolloutEngine
    from grpo_ext.evaluation import generate_answers, greedy_config, task_scorer
    from grpo_ext.models import load_causal_lm
    from grpo_ext.rollout import eos_token_ids
    from reward_models import get_reward_funcs

    set_torch_threads()
    dataset = to_prompt_answer(load_split(cli.dataset, None, "test"), instruction=cli.instruction, conversational=True)
    conversations, answers = list(dataset["prompt"]), list(dataset["answer"])
    folder, file = os.path.split(os.path.abspath(cli.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    scorer = task_scorer(dict(zip(cli.reward_funcs, get_reward_funcs(cli.reward_funcs, warn_unused=False))))

    # transformers: the file dequantised, answered as the trainer's evaluation answers (greedy, its stop tokens)
    model = load_causal_lm(cli.gguf, {"dtype": "float32"}, on_cpu=True).eval()
    stop_ids = eos_token_ids(model, tokenizer)
    sampling = GenerationConfig(
        max_new_tokens=cli.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids
    )
    engine = RolloutEngine(tokenizer, sampling, stop_ids, cli.max_new_tokens)
    hf_ids, hf_texts = generate_answers(engine, model, conversations, 1, greedy_config(sampling), batch_size=64)
    hf_texts = [text[0]["content"] if isinstance(text, list) else text for text in hf_texts]

    # llama.cpp: the same prompts, its own tokenizer and greedy sampling; then its own chat formatting
    llm = Llama(model_path=cli.gguf, n_ctx=512, n_threads=usable_cores(), verbose=False)
    stops = set(stop_ids)
    same_prompt_tokens, cpp_ids, cpp_texts, chat_texts = 0, [], [], []
    for conversation, prompt in zip(conversations, prompts, strict=True):
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        same_prompt_tokens += tokens == tokenizer(prompt, add_special_tokens=False).input_ids
        llm.reset()
        ids = []
        for token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            ids.append(token)
            if token in stops or len(ids) == cli.max_new_tokens:
                break
        cpp_ids.append(ids)
        cpp_texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        chat = llm.create_chat_completion(
            conversation, max_tokens=cli.max_new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0
        )
        chat_texts.append(chat["choices"][0]["message"]["content"] or "")

    def scores(texts):
        per_func = scorer.score(prompts, texts, [[]] * len(texts), {"answer": answers}).nan_to_num(0.0)  # (n, K)
        return {f"pass@1/{name}": float((per_func[:, k] > 0.5).float().mean()) for k, name in enumerate(scorer.names)}

    summary = {
        "gguf": cli.gguf,
        "problems": len(prompts),
        "llama_cpp": scores(cpp_texts),
        "llama_cpp_chat_completion": scores(chat_texts),
        "transformers": scores(hf_texts),
        "prompt_tokens_equal": same_prompt_tokens / len(prompts),
        "answers_token_for_token_equal": sum(a == b for a, b in zip(cpp_ids, hf_ids, strict=True)) / len(prompts),
        "chat_completion_text_equal": sum(a.strip() == b.strip() for a, b in zip(chat_texts, cpp_texts, strict=True))
        / len(prompts),
        "chat_template_in_file": llm.metadata.get("tokenizer.chat_template") == tokenizer.chat_template,
    }
    print(json.dumps(summary, indent=2))
    if cli.output:
        with open(cli.output, "w") as out:
            json.dump(summary, out, indent=2)


if __name__ == "__main__":
    main()
