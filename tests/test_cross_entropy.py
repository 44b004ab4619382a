"""The chunked vocab-parallel loss: megatron-core's values and gradients, without an fp32 copy of the logits."""

import pytest
import torch

from megatron_dataeff.models.cross_entropy import auto_chunk_tokens, chunked_vocab_parallel_cross_entropy


def _megatron(logits, target):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 24, None], ids=["chunk1", "chunk7", "chunk24", "auto"])
def test_chunked_loss_equals_megatrons_bit_for_bit(megatron_cpu, dtype, chunk):
    """Per-token losses and the logits' gradient equal megatron-core's vocab_parallel_cross_entropy
    exactly, for chunk sizes that do and do not divide the 24 tokens, in fp32 and bf16."""
    torch.manual_seed(0)
    s, b, v = 8, 3, 1000
    base = (torch.randn(s, b, v) * 3).to(dtype)
    target = torch.randint(0, v, (s, b))
    grad_out = torch.rand(s, b)
    out = {}
    for name, fn in (("megatron", lambda x: _megatron(x, target)),
                     ("chunked", lambda x: chunked_vocab_parallel_cross_entropy(x, target, chunk))):
        x = base.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward(grad_out)
        out[name] = (loss.detach(), x.grad)
    assert out["chunked"][0].dtype == torch.float32
    assert torch.equal(out["chunked"][0], out["megatron"][0])
    assert out["chunked"][1].dtype == dtype
    assert torch.equal(out["chunked"][1], out["megatron"][1])
    # and it is the cross entropy
    ref = torch.nn.functional.cross_entropy(base.float().reshape(-1, v), target.reshape(-1), reduction="none")
    torch.testing.assert_close(out["chunked"][0].reshape(-1), ref, rtol=1e-5, atol=1e-5)


def test_chunked_loss_keeps_no_fp32_logits(megatron_cpu):
    """With bf16 logits, what the chunked loss saves for backward is the bf16 logits and [tokens]-sized
    vectors; megatron-core's saves an fp32 tensor of the logits' size (so this check can fail)."""
    s, b, v = 16, 2, 4096
    logits = torch.randn(s, b, v, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (s, b))

    def saved(fn):
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append((t.dtype, t.numel())) or t, lambda t: t):
            fn()
        return found

    theirs = saved(lambda: _megatron(logits, target))
    ours = saved(lambda: chunked_vocab_parallel_cross_entropy(logits, target, 5))
    assert (torch.float32, s * b * v) in theirs
    assert not [n for dt, n in ours if dt == torch.float32 and n >= s * b * v]
    assert sum(n * (4 if dt == torch.float32 else 2) for dt, n in ours if n >= s * b * v) == s * b * v * 2


def test_auto_chunk_is_bounded():
    """The automatic chunk keeps one fp32 chunk of the paper's vocabulary under 256 MiB."""
    n = auto_chunk_tokens(151936)
    assert 1 <= n and n * 151936 * 4 <= 256 * 2**20 and (n + 1) * 151936 * 4 > 256 * 2**20
