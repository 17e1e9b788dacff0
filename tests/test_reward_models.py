"""Reward functions: math accuracy, R1 format, cosine length scaling, DAPO overlong, the neural RM and the registry."""

import functools
import importlib.util
import math
import sys
import threading

import pytest
import torch

from reward_models import (
    REWARD_FUNCS,
    NeuralRewardModel,
    accuracy_reward,
    answer_format_reward,
    get_cosine_scaled_reward,
    get_reward_funcs,
    get_soft_overlong_reward,
    r1_format_reward,
    tag_count_reward,
)
from reward_models import accuracy as accuracy_module

needs_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="needs math-verify: pip install 'grpo-ext[math]'"
)


def chat(text):
    return [{"role": "assistant", "content": text}]


# --- accuracy ---

ACCURACY_CASES = [
    # (completion, gold, expected reward)
    (r"Half of it: \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.25}", r"\frac{1}{2}", 0.0),
    ("They sold 1,000 apples in all.", "Step by step...\n#### 1,000", 1.0),
    (r"\boxed{1000}", "#### 1,000", 1.0),
    ("She pays 18 dollars.", "18", 1.0),
    (r"So the total is \boxed{\$18}", "#### 18", 1.0),
    (r"\boxed{18 \text{ dollars}}", "18", 1.0),
    ("<think>2 + 2 is 4, times 3</think>\n<answer>12 apples</answer>", "12", 1.0),
    ("no box, but 3 + 4 = 7", "7", 1.0),  # missing box: the last number
    ("no box, and 7 then 8", "7", 0.0),
    (r"First \boxed{3}, no wait: \boxed{4}", "4", 1.0),  # two boxes: the last one
    (r"First \boxed{4}, no wait: \boxed{3}", "4", 0.0),
    ("", "4", 0.0),
    ("I do not know.", "4", 0.0),
    (r"The answer is $\frac{3}{4}$.", "0.75", 1.0),  # inline math as the fallback, not its last digit
    (r"\boxed{x^2 + 1}", r"Expanding, we get $\boxed{1 + x^2}$.", 1.0),  # MATH solution
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    ("so x = -3", "-3", 1.0),
    (chat(r"It is \boxed{42}."), "42", 1.0),  # conversational
    (chat("It is 41."), "42", 0.0),
    ("42", "no answer here", None),  # unparsable gold
    ("42", "", None),
    ("42", r"Therefore \boxed{}", None),
]


@needs_math_verify
@pytest.mark.parametrize("completion, gold, expected", ACCURACY_CASES)
def test_accuracy_reward_cases(completion, gold, expected):
    assert accuracy_reward([completion], answer=[gold]) == [expected]


@needs_math_verify
def test_accuracy_reward_batch_solution_column_and_contract():
    completions = [r"\boxed{2}", "3", r"\boxed{5}"]
    assert accuracy_reward(completions, solution=[r"$\boxed{2}$", r"$\boxed{4}$", "bad gold"]) == [1.0, 0.0, None]
    # prompts and other columns arrive as keyword arguments; `answer` wins over `solution`; ints are fine
    rewards = accuracy_reward(prompts=["p"] * 3, completions=completions, completion_ids=None, answer=[2, 3, 6])
    assert rewards == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(completions)
    with pytest.raises(ValueError, match="2 gold answers for 3"):
        accuracy_reward(completions, answer=["1", "2"])


@needs_math_verify
def test_accuracy_reward_off_the_main_thread():
    """math-verify's signal-based timeouts fail off the main thread; the reward turns them off there."""
    results = []
    worker = threading.Thread(target=lambda: results.append(accuracy_reward([r"\boxed{\frac{1}{2}}"], answer=["0.5"])))
    worker.start()
    worker.join()
    assert results == [[1.0]]


def test_accuracy_reward_names_the_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'grpo-ext\[math\]'"):
        accuracy_module._math_verify()


def test_answer_extraction():
    assert accuracy_module.last_boxed(r"\boxed{\frac{1}{2}} then \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert accuracy_module.last_boxed(r"\boxed{3} and a cut-off \boxed{4") == "3"
    assert accuracy_module.extract_answer("<answer>one</answer> <answer>two</answer> 9") == "two"
    assert accuracy_module.extract_answer("costs 1,250.5 or 3-4") == "4"
    assert accuracy_module.extract_answer("nothing") is None
    assert accuracy_module.gold_expression("work\n#### 12,345") == "12345"


# --- format ---


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\nadd them\n</think>\n<answer>\n4\n</answer>", 1.0),
        ("<think>a\nb</think><answer>4</answer>\n", 1.0),
        (chat("<think>x</think> <answer>4</answer>"), 1.0),
        ("<answer>4</answer>", 0.0),
        ("<think>x</think>", 0.0),
        ("<answer>4</answer><think>x</think>", 0.0),
        ("Sure! <think>x</think><answer>4</answer>", 0.0),
        ("<think>x</think><answer>4</answer> and more", 0.0),
        ("<think>x</think><answer>4</answer><answer>5</answer>", 0.0),
        ("<think>x<think>y</think><answer>4</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_r1_format_reward(completion, expected):
    assert r1_format_reward([completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\nadd them\n</think>\n<answer>\n4\n</answer>", 1.0),
        (chat("<think>\nadd them\n</think>\n<answer>\n4\n</answer>"), 1.0),
        ("<think>\nadd them\n</think>\n<answer>4</answer>", 0.5),  # answer tags without their newlines
        ("<think>\nx\n</think>\n<think>\ny\n</think>\n<answer>\n4\n</answer>", 0.5),  # think tags twice
        ("<think>add</think><answer>4</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_tag_count_reward(completion, expected):
    assert tag_count_reward([completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("6 * 4 = 24\nAnswer: 24", 1.0),
        ("Answer: 12", 1.0),  # any number: the form alone
        (chat("x\nAnswer: 7\n"), 1.0),
        ("**Answer:** -3.5", 1.0),
        ("answer: 1,000.", 1.0),
        ("The answer is 12", 0.0),
        ("Answer: twelve", 0.0),
        ("Answer: 12\nbye", 0.0),  # not the last line
        ("", 0.0),
    ],
)
def test_answer_format_reward_pays_for_the_form_alone(completion, expected):
    assert answer_format_reward([completion], answer=["99"]) == [expected]


# --- length ---


def cosfn(t, T, eta_min, eta_max):
    """arXiv 2502.03373, eq. 1."""
    return eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos(t * math.pi / T))


@needs_math_verify
def test_cosine_scaled_reward_matches_the_closed_form():
    reward = get_cosine_scaled_reward(max_len=100)
    assert reward.__name__ == "cosine_scaled_reward"
    lengths = [0, 25, 50, 100, 150]
    right, wrong = r"\boxed{7}", r"\boxed{8}"
    completions = [right] * 5 + [wrong] * 5
    ids = [[0] * n for n in lengths] * 2
    rewards = reward(prompts=["p"] * 10, completions=completions, completion_ids=ids, answer=["7"] * 10)
    expected_right = [cosfn(min(t, 100), 100, 0.5, 1.0) for t in lengths]  # short and right is best
    expected_wrong = [cosfn(min(t, 100), 100, -0.5, -1.0) for t in lengths]  # short and wrong is worst
    assert rewards == pytest.approx(expected_right + expected_wrong)
    assert rewards[:5] == pytest.approx([1.0, 0.5 + 0.25 * (1 + math.sqrt(0.5)), 0.75, 0.5, 0.5])
    assert rewards[5:] == pytest.approx([-1.0, -0.5 - 0.25 * (1 + math.sqrt(0.5)), -0.75, -0.5, -0.5])


@needs_math_verify
def test_cosine_scaled_reward_custom_values_chars_and_unscorable():
    reward = get_cosine_scaled_reward(min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=1.0,
                                      max_value_correct=3.0, max_len=20)  # fmt: skip
    completions = ["answer 5", "answer 6", chat("5"), "5"]  # 8, 8 and 1 characters without completion_ids
    rewards = reward(completions, solution=["5", "5", "5", "unparsable"])
    assert rewards == pytest.approx([cosfn(8, 20, 1.0, 3.0), cosfn(8, 20, 0.0, -2.0), cosfn(1, 20, 1.0, 3.0), None])
    with pytest.raises(ValueError, match="max_len"):
        get_cosine_scaled_reward(max_len=0)


def test_soft_overlong_reward_values():
    reward = get_soft_overlong_reward(max_completion_len=20, soft_punish_cache=5)
    assert reward.__name__ == "soft_overlong_reward"
    lengths = [0, 10, 15, 16, 18, 20, 25]
    # DAPO eq. 13: 0 up to 20 - 5, then ((20 - 5) - |y|) / 5, then -1
    assert reward(["x"] * 7, completion_ids=[[1] * n for n in lengths]) == pytest.approx(
        [0.0, 0.0, 0.0, -0.2, -0.6, -1.0, -1.0]
    )
    hard = get_soft_overlong_reward(max_completion_len=20, soft_punish_cache=0)
    assert hard(["x"] * 3, completion_ids=[[1] * 20, [1] * 21, [1] * 3]) == [0.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="completion_ids"):
        reward(["x"])
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_reward(max_completion_len=10, soft_punish_cache=11)


# --- registry ---


def test_registry_names():
    assert set(REWARD_FUNCS) == {
        "accuracy",
        "answer_line",
        "answer_format",
        "format",
        "tag_count",
        "cosine",
        "soft_overlong",
    }
    funcs = get_reward_funcs(
        ["accuracy", "format", "tag_count", "cosine", "soft_overlong"],
        max_len=50,
        max_completion_len=10,
        soft_punish_cache=4,
    )
    assert funcs[:3] == [accuracy_reward, r1_format_reward, tag_count_reward]
    assert [f.__name__ for f in funcs[3:]] == ["cosine_scaled_reward", "soft_overlong_reward"]
    assert funcs[4](["x"], completion_ids=[[1] * 10]) == [-1.0]


@needs_math_verify
def test_registry_cosine_gets_max_len():
    (cosine,) = get_reward_funcs(["cosine"], max_len=50)
    assert cosine([r"\boxed{1}"] * 2, completion_ids=[[1] * 25, [1] * 50], answer=["1"] * 2) == pytest.approx(
        [0.75, 0.5]
    )


def test_registry_factory_kwargs_reach_the_factories():
    (soft,) = get_reward_funcs(["soft_overlong"], max_completion_len=10, soft_punish_cache=4)
    assert soft(["x", "x"], completion_ids=[[1] * 8, [1] * 6]) == pytest.approx([-0.5, 0.0])  # (6 - 8) / 4
    with pytest.raises(ValueError, match="max_completion_len"):
        get_reward_funcs(["soft_overlong"])
    with pytest.warns(UserWarning, match="max_lenn"):
        get_reward_funcs(["cosine"], max_lenn=10)


def test_registry_dotted_paths(tmp_path, monkeypatch, request):
    assert get_reward_funcs(["reward_models.format:r1_format_reward"]) == [r1_format_reward]
    assert get_reward_funcs(["reward_models.format.tag_count_reward"]) == [tag_count_reward]
    (tmp_path / "my_test_rewards.py").write_text(
        "def length_reward(completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n\n"
        "def get_constant_reward(value=1.0):\n"
        "    def constant_reward(completions, **kwargs):\n"
        "        return [value] * len(completions)\n"
        "    return constant_reward\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("my_test_rewards", None))
    length, constant = get_reward_funcs(
        ["my_test_rewards:length_reward", "my_test_rewards.get_constant_reward"], value=3.0
    )
    assert length(["ab", "abc"]) == [2.0, 3.0]
    assert constant.__name__ == "constant_reward"
    assert constant(["ab", "abc"]) == [3.0, 3.0]


def test_registry_unknown_names():
    with pytest.raises(ValueError, match="'acuracy'") as error:
        get_reward_funcs(["acuracy"])
    for hint in ["accuracy", "cosine", "soft_overlong", "my_pkg.rewards:my_func", "my_pkg.rewards.my_func"]:
        assert hint in str(error.value)
    with pytest.raises(ValueError, match="no_such_package_xyz"):
        get_reward_funcs(["no_such_package_xyz.rewards:f"])
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        get_reward_funcs(["reward_models.format:nope"])


# --- neural reward model ---


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory):
    from grpo_ext.testing import save_tiny_reward_model

    return save_tiny_reward_model(tmp_path_factory.mktemp("models") / "tiny-rm")


def tiny_rm(path, **kwargs):
    """The tiny reward model with `make_tokenizer()`: reloading the saved tokenizer with AutoTokenizer drops spaces."""
    from grpo_ext.testing import make_tokenizer

    return NeuralRewardModel(path, tokenizer=make_tokenizer(), **kwargs)


@functools.lru_cache
def _plain_model(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()


def direct_score(path, text):
    """The reward model's logit for one text, computed without NeuralRewardModel."""
    from grpo_ext.testing import make_tokenizer

    inputs = make_tokenizer()(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return _plain_model(path)(**inputs).logits[0, 0].item()


PROMPTS = ["1+2=", "What is 7*8?", "9-9=", "A long prompt, about sums: 3+4+5+6=", "2="]
COMPLETIONS = ["3", "56, because 7 eights", "0", "18", chat("two")]


def test_neural_reward_model_batched_equals_unbatched(reward_model_path):
    batched = tiny_rm(reward_model_path, batch_size=3)
    single = tiny_rm(reward_model_path, batch_size=1)
    assert batched.__name__ == "reward_model_tiny_rm"
    assert batched.device == torch.device("cpu")
    scores = batched(PROMPTS, COMPLETIONS, completion_ids=None, answer=["x"] * 5)
    assert all(isinstance(score, float) for score in scores)
    assert scores == pytest.approx(single(PROMPTS, COMPLETIONS), abs=1e-5)
    assert len({round(score, 4) for score in scores}) == len(scores)  # the inputs really are told apart
    assert scores[0] == pytest.approx(direct_score(reward_model_path, "1+2=3"), abs=1e-5)
    assert scores[1] == pytest.approx(direct_score(reward_model_path, "What is 7*8?56, because 7 eights"), abs=1e-5)
    assert scores[4] == pytest.approx(direct_score(reward_model_path, "2=two"), abs=1e-5)


def test_neural_reward_model_conversational_prompts(reward_model_path):

    model = tiny_rm(reward_model_path, batch_size=2)
    prompts = [
        [{"role": "user", "content": "1+2="}],
        [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2="}],
    ]
    scores = model(prompts, [chat("3"), "4"])
    expected_texts = [
        "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n",
        "<|im_start|>system\nBe short.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    ]
    assert model.texts(prompts, [chat("3"), "4"]) == expected_texts
    assert scores == pytest.approx([direct_score(reward_model_path, text) for text in expected_texts], abs=1e-5)


def test_neural_reward_model_max_length_keeps_the_end(reward_model_path):
    model = tiny_rm(reward_model_path, max_length=4)
    model.tokenizer.truncation_side = "right"
    assert model(["abcdefgh"], ["ij"]) == pytest.approx([direct_score(reward_model_path, "ghij")], abs=1e-5)
    assert model.tokenizer.truncation_side == "right"  # restored after the call


def test_neural_reward_model_from_a_loaded_model(reward_model_path):
    from transformers import AutoModelForSequenceClassification

    from grpo_ext.testing import make_tokenizer

    loaded = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
    model = NeuralRewardModel(loaded, tokenizer=make_tokenizer())
    assert model.__name__ == "reward_model_tiny_rm"
    assert model(PROMPTS, COMPLETIONS) == pytest.approx(tiny_rm(reward_model_path)(PROMPTS, COMPLETIONS), abs=1e-6)
    # without a tokenizer, the one saved beside the model is loaded
    from_path = NeuralRewardModel(reward_model_path)
    assert from_path(["1+2="], ["3"]) == pytest.approx([direct_score(reward_model_path, "1+2=3")], abs=1e-5)


def test_neural_reward_model_with_a_lora_adapter(reward_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tiny_rm(reward_model_path)(PROMPTS, COMPLETIONS)

    def save_adapter(path, perturb):
        model = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
        config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        peft_model = get_peft_model(model, config)
        if perturb:
            torch.manual_seed(0)
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(std=0.5)
        peft_model.save_pretrained(path)
        return peft_model.eval()

    # LoRA starts as the identity (B = 0): same scores as the base model
    save_adapter(tmp_path / "identity", perturb=False)
    assert tiny_rm(reward_model_path, adapter_path=tmp_path / "identity")(PROMPTS, COMPLETIONS) == (
        pytest.approx(base, abs=1e-5)
    )
    # perturbed adapter: different scores, the ones the in-memory adapted model gives
    in_memory = save_adapter(tmp_path / "perturbed", perturb=True)
    adapted = tiny_rm(reward_model_path, adapter_path=tmp_path / "perturbed", batch_size=2)
    scores = adapted(PROMPTS, COMPLETIONS)
    assert max(abs(a - b) for a, b in zip(scores, base)) > 1e-3
    with torch.no_grad():
        expected = [in_memory(**adapted.tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                    for t in adapted.texts(PROMPTS, COMPLETIONS)]  # fmt: skip
    assert scores == pytest.approx(expected, abs=1e-5)


def test_neural_reward_model_rejects_bad_arguments(reward_model_path):
    with pytest.raises(ValueError, match="batch_size"):
        NeuralRewardModel(reward_model_path, batch_size=0)
    from transformers import AutoModelForSequenceClassification

    two_labels = AutoModelForSequenceClassification.from_pretrained(
        reward_model_path, num_labels=2, ignore_mismatched_sizes=True
    )
    with pytest.raises(ValueError, match="num_labels=1"):
        NeuralRewardModel(two_labels)
