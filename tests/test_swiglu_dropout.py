"""Fused SwiGLU + dropout: kernel vs reference (mask exact, values to rounding), gradients, dropout statistics."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_dataeff.ops import extension
from megatron_dataeff.ops.swiglu_dropout import (
    dropout_keep_mask, dropout_keep_mask_reference, swiglu_dropout, swiglu_dropout_reference,
)

from tests.conftest import KERNEL, KERNEL_DEVICES as DEVICES

SEED, KEY = 0xDEADBEEF_0042, 0x0123_4567_89AB_CDEF
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@contextlib.contextmanager
def _on_kernel(device):
    """Within the block the ops run the compiled kernel of `device`, asserted: never the reference."""
    with extension.force_reference(False):
        impl = extension.implementation(device)
        assert impl == KERNEL[device], (f"{device} tensors run {impl!r}, not the {KERNEL[device]!r} kernel: "
                                        f"{extension.load_error(device)}")
        yield


def _kernel(x, *args, **kw):
    """swiglu_dropout on the compiled kernel of x's device."""
    with _on_kernel(x.device.type):
        return swiglu_dropout(x, *args, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 2 * 37), (0, 8), (4, 0), (2, 2 * 4100)])
def test_forward_backward_match_reference(shape, p, dtype, device):
    """Same dropped positions as the reference; forward and backward values agree to the dtype's rounding."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn((*shape[:-1], shape[-1] // 2), generator=gen, dtype=torch.float64).to(dtype)
    xr = x.clone().requires_grad_()
    ref = swiglu_dropout_reference(xr, p, KEY, SEED)
    ref.backward(dy)
    xk = x.to(device).requires_grad_()
    out = _kernel(xk, p, KEY, SEED)
    assert type(out.grad_fn).__name__ == "SwiGLUDropoutBackward"  # the fused autograd function, not the reference
    out.backward(dy.to(device))
    assert out.shape == ref.shape and out.dtype == dtype
    keep = dropout_keep_mask_reference(ref.numel() // max(ref.shape[-1], 1) if ref.numel() else 0, ref.shape[-1],
                                       p, KEY, SEED).reshape(ref.shape) if p > 0 else torch.ones(ref.shape, dtype=torch.bool)
    assert (out.cpu()[~keep] == 0).all()
    tol = TOL[dtype] * 4
    torch.testing.assert_close(out.cpu().double(), ref.detach().double(), rtol=tol, atol=tol)
    torch.testing.assert_close(xk.grad.cpu().double(), xr.grad.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rows,f,col_offset,total", [(1, 1, 0, None), (7, 13, 0, None), (5, 10, 3, 17),
                                                     (3, 1000, 1000, 4000), (2, 6, 2**33, 2**34)])
def test_keep_mask_exact(rows, f, col_offset, total, p, device):
    """The kernel's keep mask equals the reference stream exactly, for shards and 2**34+ element indices."""
    with _on_kernel(device):
        got = dropout_keep_mask(rows, f, p, KEY, SEED, col_offset, total, device=device)
    assert torch.equal(got.cpu(), dropout_keep_mask_reference(rows, f, p, KEY, SEED, col_offset, total))


def test_tensor_parallel_shards_draw_the_unsharded_numbers():
    """Two shards of F (col_offset, total_ffn) give the halves of the unsharded output."""
    x = torch.randn(4, 3, 2 * 16)
    whole = swiglu_dropout(x, 0.4, KEY, SEED)
    a, b = x.chunk(2, dim=-1)
    shards = [swiglu_dropout(torch.cat([a[..., r * 8:(r + 1) * 8], b[..., r * 8:(r + 1) * 8]], -1), 0.4, KEY, SEED,
                             col_offset=r * 8, total_ffn=16) for r in range(2)]
    torch.testing.assert_close(torch.cat(shards, -1), whole, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scaling(p):
    """The kept fraction is 1 - p (5 standard deviations), kept values are scaled by 1/(1-p), call keys differ."""
    x = torch.ones(200, 2 * 500)
    y = swiglu_dropout(x, p, KEY, SEED)
    base = F.silu(torch.ones(())) * 1.0
    kept = y != 0
    n = kept.numel()
    assert abs(kept.sum().item() - n * (1 - p)) <= 5 * (n * p * (1 - p)) ** 0.5
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], (base / (1 - p)).item()))
    other = swiglu_dropout(x, p, KEY + 1, SEED) != 0
    assert not torch.equal(kept, other)
    assert torch.equal(swiglu_dropout(x, p, KEY, SEED, training=False), F.silu(x[:, :500]) * x[:, 500:])


def test_reference_gradcheck():
    """The reference is differentiable and its gradient is right (float64 gradcheck, fixed mask)."""
    x = torch.randn(3, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swiglu_dropout_reference(t, 0.4, KEY, SEED), (x,))


def test_kernel_gradcheck():
    """The fused backward (mask regenerated, not stored) is the derivative of the fused forward (float64)."""
    x = torch.randn(3, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _kernel(t, 0.4, KEY, SEED), (x,))


def test_kernel_saves_only_x():
    """The fused op keeps one tensor (x) for backward: no mask, no silu(a)."""
    saved = []
    x = torch.randn(4, 2 * 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _kernel(x, 0.3, KEY, SEED)
    assert len(saved) == 1 and saved[0].shape == x.shape


def test_invalid_inputs_raise():
    """Integer x, odd last dimension, p outside [0, 1], bad keys or shard bounds raise."""
    x = torch.randn(2, 8)
    with pytest.raises(TypeError):
        swiglu_dropout(x.long(), 0.1, KEY, SEED)
    for args, kw in [((x[:, :7], 0.1, KEY, SEED), {}), ((x, 1.5, KEY, SEED), {}), ((x, -0.1, KEY, SEED), {}),
                     ((x, 0.1, -1, SEED), {}), ((x, 0.1, 2**64, SEED), {}), ((x, 0.1, KEY, -1), {}),
                     ((x, 0.1, KEY, SEED), dict(col_offset=-1)), ((x, 0.1, KEY, SEED), dict(total_ffn=3))]:
        with pytest.raises(ValueError):
            swiglu_dropout(*args, **kw)
