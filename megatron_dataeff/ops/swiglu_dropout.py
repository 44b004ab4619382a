"""Fused SwiGLU + dropout for the MLP: y = dropout(silu(a) * b), x = [..., 2F], a = x[..., :F], b = x[..., F:].

The split is megatron-core's gated linear unit (`torch.chunk(x, 2, dim=-1)`, `silu(x0) * x1`); dropout is
inverted (kept values scaled by 1/(1-p)).  The fused kernel does not store the dropout mask: the
backward draws it again from the counter-based Philox stream, so dropout costs no activation memory
beyond the x that SwiGLU keeps anyway.

Keying (the contract shared with csrc/philox.h `dropout_block`):

    key     = seed_key(seed)                                     # as everywhere, ops/philox.py
    element e = row * total_F + col_offset + col                 # row over the flattened leading dims
    block   = e // 4, lane e % 4 of
    counter = (block & 0xFFFFFFFF, call_key & 0xFFFFFFFF, call_key >> 32,
               STREAM_DROPOUT | (block >> 32) << 8)
    dropped iff uniform(x) < p, i.e. (x >> 8) < ceil(p * 2**24)

`call_key` (64 bits) must be unique per (layer, iteration, micro-batch) -- e.g. from
`dropout_call_key` -- or two calls drop the same positions.  `col_offset` and `total_F` make a
tensor-parallel shard of F draw the numbers of the unsharded tensor: rank r of a TP group holding
columns [r F/tp, (r+1) F/tp) passes col_offset = r F/tp, total_F = F.

`swiglu_dropout` dispatches to the C++/CUDA kernel where built (see `ops.extension`); the fallback and
the definition is `swiglu_dropout_reference` (plain torch autograd, same mask).  Activation values agree
with the reference to rounding (different exp), the dropout mask exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_dataeff.ops import extension, philox

_MASK32 = 0xFFFFFFFF


def dropout_call_key(layer: int, iteration: int, micro_batch: int) -> int:
    """A 64-bit call key unique per (layer < 2**12, iteration < 2**36, micro_batch < 2**16)."""
    if not (0 <= layer < 2**12 and 0 <= iteration < 2**36 and 0 <= micro_batch < 2**16):
        raise ValueError(f"call key fields out of range: {(layer, iteration, micro_batch)}")
    return (iteration << 28) | (micro_batch << 12) | layer


def dropout_threshold(p: float) -> int:
    """ceil(p * 2**24): an element is dropped iff (x >> 8) < threshold (exact: p * 2**24 is exact)."""
    return math.ceil(p * 2**24)


def dropout_scale(p: float) -> float:
    """1 / (1 - p), or 0 when p == 1 (everything is dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_keep_mask_reference(rows: int, f: int, p: float, call_key: int, seed: int, col_offset: int = 0,
                                total_ffn: int | None = None) -> torch.Tensor:
    """[rows, f] bool, True where swiglu_dropout keeps the element (plain torch, CPU)."""
    total = f if total_ffn is None else total_ffn
    e = (torch.arange(rows, dtype=torch.int64)[:, None] * total + col_offset
         + torch.arange(f, dtype=torch.int64)[None, :]).reshape(-1)
    block = e >> 2
    words = philox.philox4x32(
        (block & _MASK32, call_key & _MASK32, (call_key >> 32) & _MASK32,
         philox.STREAM_DROPOUT | ((block >> 32) << 8)),
        philox.seed_key(seed),
    )
    x = torch.stack(words, dim=-1).gather(1, (e & 3)[:, None])[:, 0]
    return ((x >> 8) >= dropout_threshold(p)).reshape(rows, f)


def swiglu_dropout_reference(x: torch.Tensor, p: float, call_key: int, seed: int, training: bool = True,
                             col_offset: int = 0, total_ffn: int | None = None) -> torch.Tensor:
    """The plain-torch definition: silu(a) * b, then inverted dropout with the keyed mask.  [..., 2F] -> [..., F]."""
    a, b = torch.chunk(x, 2, dim=-1)
    y = F.silu(a) * b
    if training and p > 0:
        f = y.shape[-1]
        rows = y.numel() // f if f else 0
        keep = dropout_keep_mask_reference(rows, f, p, call_key, seed, col_offset, total_ffn)
        y = y * keep.reshape(y.shape).to(device=y.device, dtype=y.dtype) * dropout_scale(p)
    return y


def _kernel_args(p, call_key, seed, training, col_offset, total_f):
    k0, k1 = philox.seed_key(seed)
    threshold = dropout_threshold(p) if training else 0
    scale = dropout_scale(p) if training else 1.0
    return (k0, k1, call_key & _MASK32, (call_key >> 32) & _MASK32, threshold, scale, col_offset, total_f)


def _call(name: str, device: torch.device, *args):
    if device.type == "cuda":
        with torch.cuda.device(device):
            return getattr(extension.cuda_module(), name)(*args, extension.cuda_stream(device))
    return getattr(extension.cpu_module(), name)(*args)


class SwiGLUDropout(torch.autograd.Function):
    """The fused kernel as an autograd function: saves x only, regenerates the mask in backward."""

    @staticmethod
    def forward(ctx, x, kernel_args):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
        y = _call("swiglu_dropout_forward", x.device, x2, *kernel_args)
        ctx.save_for_backward(x2)
        ctx.kernel_args, ctx.x_shape = kernel_args, x.shape
        return y.reshape(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape[0], dy.shape[-1]).to(x2.dtype).contiguous()
        dx = _call("swiglu_dropout_backward", x2.device, x2, dy2, *ctx.kernel_args)
        return dx.reshape(ctx.x_shape), None


def _check(x, p, call_key, seed, col_offset, total_ffn):
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32/float64/bfloat16/float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., 2F], got shape {tuple(x.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout p must be in [0, 1], got {p}")
    if not 0 <= call_key < 2**64:
        raise ValueError(f"call_key must be in [0, 2**64), got {call_key}")
    philox.seed_key(seed)
    f = x.shape[-1] // 2
    total = f if total_ffn is None else total_ffn
    if col_offset < 0 or total < col_offset + f:
        raise ValueError(f"need 0 <= col_offset and col_offset + F <= total_ffn, got {col_offset}, {f}, {total}")
    return total


def swiglu_dropout(x: torch.Tensor, p: float, call_key: int, seed: int, training: bool = True,
                   col_offset: int = 0, total_ffn: int | None = None) -> torch.Tensor:
    """dropout(silu(a) * b) of x = [..., 2F] -> [..., F], fused where the extension is built.

    p: dropout probability; call_key: 64-bit key unique per (layer, iteration, micro-batch); seed: the
    run's seed; training=False (or p=0) skips dropout; col_offset/total_ffn: this shard's place in the
    global F (tensor parallelism).
    """
    total = _check(x, p, call_key, seed, col_offset, total_ffn)
    if extension.implementation(x.device) == "torch":
        return swiglu_dropout_reference(x, p, call_key, seed, training, col_offset, total)
    return SwiGLUDropout.apply(x, _kernel_args(p, call_key, seed, training, col_offset, total))


def dropout_keep_mask(rows: int, f: int, p: float, call_key: int, seed: int, col_offset: int = 0,
                      total_ffn: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows, f] bool keep mask of a swiglu_dropout call, from the kernel where built (for tests, checks)."""
    device = torch.device(device)
    total = f if total_ffn is None else total_ffn
    if extension.implementation(device) == "torch":
        return dropout_keep_mask_reference(rows, f, p, call_key, seed, col_offset, total).to(device)
    k0, k1, lo, hi, threshold, _, _, _ = _kernel_args(p, call_key, seed, True, col_offset, total)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return extension.cuda_module().dropout_keep_mask(rows, f, k0, k1, lo, hi, threshold, col_offset, total,
                                                              extension.cuda_stream(device))
    return extension.cpu_module().dropout_keep_mask(rows, f, k0, k1, lo, hi, threshold, col_offset, total)
