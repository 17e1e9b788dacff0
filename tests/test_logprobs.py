import pytest
import torch

from grpo_ext.logprobs import completion_logps_and_entropies
from grpo_ext.testing import TINY_ARCHITECTURES, make_tiny_model


def _full_logits_reference(model, input_ids, attention_mask, keep, temperature):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, -keep - 1 : -1].float() / temperature
    log_probs = torch.log_softmax(logits, -1)
    logps = log_probs.gather(-1, input_ids[:, -keep:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    mask = attention_mask[:, -keep:]
    return logps * mask, entropy * mask


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_logps_equal_full_logits_with_gradients(tokenizer, architecture, chunk_size):
    model = make_tiny_model(architecture, tokenizer)
    input_ids = torch.randint(4, 80, (3, 11), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, -3:] = 0  # a completion that ended early

    logps, entropy = completion_logps_and_entropies(model, input_ids, attention_mask, 5, 0.7, chunk_size)
    (grad,) = torch.autograd.grad((logps * torch.arange(15.0).view(3, 5)).sum(), model.lm_head.weight)
    expected_logps, expected_entropy = _full_logits_reference(model, input_ids, attention_mask, 5, 0.7)
    (expected_grad,) = torch.autograd.grad((expected_logps * torch.arange(15.0).view(3, 5)).sum(), model.lm_head.weight)

    torch.testing.assert_close(logps, expected_logps, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=2e-6, rtol=1e-5)


def test_lm_head_never_sees_more_than_a_chunk(tokenizer):
    """The (B, T, V) logits are never built: the LM head only ever projects `chunk_size` tokens at once."""
    model = make_tiny_model("qwen2", tokenizer)
    rows_seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows_seen.append(output.shape[:-1].numel()))
    input_ids = torch.randint(4, 80, (8, 40))
    logps, _ = completion_logps_and_entropies(model, input_ids, torch.ones_like(input_ids), 32, chunk_size=16)
    logps.sum().backward()  # the backward recomputes chunks, never the whole
    assert rows_seen and max(rows_seen) <= 16
    assert sum(rows_seen) >= 8 * 32  # every completion token was scored
