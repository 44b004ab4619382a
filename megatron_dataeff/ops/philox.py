"""Counter-based Philox4x32-10 random numbers in plain torch (the reference stream).

This is the single definition of the noise every objective uses.  The C++/CUDA kernels in
`csrc/philox.h` implement the same function and must produce bit-identical numbers.

Stream layout (the contract shared with `csrc/`):

    key     = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)                     # 64-bit seed
    counter = (block, index & 0xFFFFFFFF, (index >> 32) & 0xFFFFFFFF, stream)   # 128 bits

`index` is what the numbers belong to (a global sample index, a batch index), `stream` says what
they are for (see `STREAM_*`), and `block` counts 4-number blocks: element `j` of a stream is lane
`j % 4` of block `j // 4`.  A uint32 `x` becomes a float32 uniform in [0, 1) as `(x >> 8) * 2**-24`,
which is exact in float32 on every device.
"""

from __future__ import annotations

import torch

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF

# What a stream is used for.  Evaluation adds EVAL_STREAM_OFFSET so its noise never meets training's.
STREAM_TOKEN = 0  # one uniform per token position: is the token masked?
STREAM_RATE = 1  # one uniform per sample: its mask rate (t for mdm, r for uniform token dropout)
STREAM_STRATA = 2  # reserved for batch-level draws
STREAM_DROPOUT = 3  # activation dropout, keyed by a per-call key instead of a sample (ops/swiglu_dropout.py)
STREAM_NOISE_ID = 4  # one uniform per token position: the random id replacing a dropped token (ops/corruption.py)
STREAM_NOISE_KIND = 5  # one uniform per token position: [MASK], random or kept, for BERT-style noise
STREAM_OBJECTIVE = 6  # one uniform per sample: AR or masked diffusion, for the dual objective
EVAL_STREAM_OFFSET = 16


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * x, with m, x < 2**32, in int64 arithmetic.

    The product can exceed int64, so x is split into 16-bit halves: m*x = a*2**16 + b with
    a = m*(x >> 16), b = m*(x & 0xFFFF), both < 2**48.
    """
    a = m * (x >> 16)
    b = m * (x & 0xFFFF)
    hi = (a + (b >> 16)) >> 16
    lo = (((a & 0xFFFF) << 16) + b) & _MASK32
    return hi, lo


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of a broadcastable 4-tuple of int64 counters (values < 2**32) and a 2-word key.

    Returns four int64 tensors holding uint32 values.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for round_ in range(10):
        if round_ > 0:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key of a 64-bit seed."""
    if seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & _MASK32, (seed >> 32) & _MASK32


def uint32_stream(seed: int, index: torch.Tensor, stream: int, length: int) -> torch.Tensor:
    """Elements 0..length-1 of the stream (seed, index, stream) for each index.

    index: [n] int64, non-negative.  Returns [n, length] int64 holding uint32 values.
    """
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1, 1)
    if index.numel() and int(index.min()) < 0:
        raise ValueError("stream indices must be non-negative")
    blocks = (length + 3) // 4
    block = torch.arange(blocks, dtype=torch.int64).reshape(1, -1)
    out = philox4x32((block, index & _MASK32, (index >> 32) & _MASK32, stream), seed_key(seed))
    # [n, blocks, 4] -> [n, blocks*4]: element j is lane j % 4 of block j // 4
    return torch.stack(out, dim=-1).reshape(index.shape[0], blocks * 4)[:, :length]


def to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 values (int64 tensor) -> float32 uniforms in [0, 1), exactly (x >> 8) * 2**-24."""
    return (x >> 8).to(torch.float32) * (2.0**-24)


def uniform(seed: int, index: torch.Tensor, stream: int, length: int) -> torch.Tensor:
    """[n, length] float32 uniforms in [0, 1) of the stream (seed, index, stream)."""
    return to_uniform(uint32_stream(seed, index, stream, length))
