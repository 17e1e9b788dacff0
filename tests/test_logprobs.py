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


def test_gemma2_softcapping_is_applied(tokenizer):
    """Gemma-2 caps its logits in forward; the chunked path must score the same distribution."""
    model = make_tiny_model("gemma2", tokenizer, final_logit_softcapping=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # large logits, so the cap matters
    input_ids = torch.randint(4, 80, (2, 9))
    mask = torch.ones_like(input_ids)
    logps, _ = completion_logps_and_entropies(model, input_ids, mask, 4)
    expected, _ = _full_logits_reference(model, input_ids, mask, 4, 1.0)
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=1e-4)


def test_unknown_logit_transform_is_refused(tokenizer, monkeypatch):
    from grpo_ext import logprobs

    model = make_tiny_model("qwen2", tokenizer)
    logprobs.check_against_full_logits(model)  # a plain model passes
    other = make_tiny_model("llama", tokenizer)
    original = type(other).forward

    def forward_with_scaled_logits(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        outputs.logits = outputs.logits * 30.0  # a post-processing step the chunked path does not know
        return outputs

    monkeypatch.setattr(type(other), "forward", forward_with_scaled_logits)
    with pytest.raises(NotImplementedError, match="differ from the model's own logits"):
        logprobs.check_against_full_logits(other)


@pytest.mark.slow  # two processes
def test_ddp_wrapped_model_synchronises_gradients(tmp_path):
    """The scoring pass goes through DDP's forward, so two processes end with the same gradient."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        from torch.nn.parallel import DistributedDataParallel

        def run(rank, port):
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=2)
            torch.set_num_threads(1)
            from grpo_ext.logprobs import completion_logps_and_entropies
            from grpo_ext.testing import make_tiny_model
            model = DistributedDataParallel(make_tiny_model(seed=0))
            ids = torch.randint(4, 80, (2, 8), generator=torch.Generator().manual_seed(rank))  # different data
            logps, _ = completion_logps_and_entropies(model, ids, torch.ones_like(ids), 4)
            logps.sum().backward()
            grad = model.module.lm_head.weight.grad
            grads = [torch.zeros_like(grad) for _ in range(2)]
            dist.all_gather(grads, grad)
            assert torch.allclose(grads[0], grads[1]), "gradients differ across processes"
            print(f"rank {rank}: gradients equal", flush=True)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(run, args=(int(sys.argv[1]),), nprocs=2)
    """)
    )
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300)
    # Each rank says so after its assertion. The exit status is not read: gloo's threads sometimes abort the process
    # at teardown ("terminate called without an active exception") after both ranks have finished.
    assert "rank 0: gradients equal" in result.stdout and "rank 1: gradients equal" in result.stdout, result.stderr[
        -3000:
    ]


def test_self_check_ignores_dropout(tokenizer):
    """A model handed over in train mode with heavy dropout passes the check (it runs in eval mode) and stays in
    train mode afterwards."""
    from grpo_ext.logprobs import check_against_full_logits

    model = make_tiny_model("qwen2", tokenizer, attention_dropout=0.9).train()
    check_against_full_logits(model)
    assert model.training
