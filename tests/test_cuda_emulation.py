"""The CUDA kernels (csrc/*.cu), run on the CPU through csrc/emulation/, against the torch references.

Built with the host compiler and -DMDE_CUDA_EMULATION, the real kernels and launchers run block by block,
their threads as fibers that switch at __syncthreads().  The grid caps are lowered to 3 x 2 blocks, so the
grid-stride loops run too; __CUDA_ARCH__ is defined, so the device branches of philox.h run (on host
versions of __umulhi and the _rn intrinsics: each is one correctly rounded IEEE operation, as on the
device).  This checks what a GPU-less machine can check: index arithmetic, tails, TP column offsets,
the per-row rate shared through shared memory, launch shapes.
The device's own arithmetic, bf16/fp16 units and speed are checked on a real GPU: benchmarks/gpu_check.sh.
"""

import ctypes
import math
import platform
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from megatron_dataeff.ops import philox
from megatron_dataeff.ops.masking import MODES, mask_tokens_reference
from megatron_dataeff.ops.swiglu_dropout import (
    dropout_keep_mask_reference, dropout_scale, dropout_threshold, swiglu_dropout_reference,
)

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = shutil.which("g++") or shutil.which("c++")
SEED = 0x1234_5678_9ABC
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # kernels.h DType

pytestmark = pytest.mark.skipif(CXX is None or platform.system() != "Linux",
                                reason="needs a C++ compiler and glibc's ucontext")

c_int64, c_uint32, c_double, c_void_p, c_int = (ctypes.c_int64, ctypes.c_uint32, ctypes.c_double,
                                                 ctypes.c_void_p, ctypes.c_int)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The .cu files compiled for the host, with the C entry points of csrc/emulation/capi.cpp."""
    lib = tmp_path_factory.mktemp("emu") / "libmde_cuda_emulation.so"
    cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Werror",
           "-Wno-unknown-pragmas", "-DMDE_CUDA_EMULATION", "-D__CUDA_ARCH__=900", "-DMDE_MAX_GRID_X=3", "-DMDE_MAX_GRID_Y=2", f"-I{CSRC / 'emulation'}", f"-I{CSRC}",
           "-x", "c++", *map(str, sorted(CSRC.glob("*.cu"))), "-x", "none", str(CSRC / "emulation" / "capi.cpp"),
           "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    so = ctypes.CDLL(str(lib))
    so.emu_philox.argtypes = [c_void_p, c_int64, c_uint32, c_uint32, c_void_p]
    so.emu_mask_tokens.argtypes = [c_int, c_void_p, c_void_p, c_int64, c_int64, c_uint32, c_uint32, c_int, c_double,
                                   c_double, c_int64, c_uint32, c_int64, c_void_p, c_void_p, c_void_p, c_void_p]
    dropout = [c_uint32, c_uint32, c_uint32, c_uint32, c_uint32, c_double, c_int64, c_int64]
    so.emu_swiglu_fwd.argtypes = [c_int, c_void_p, c_void_p, c_int64, c_int64, *dropout]
    so.emu_swiglu_bwd.argtypes = [c_int, c_void_p, c_void_p, c_void_p, c_int64, c_int64, *dropout]
    so.emu_dropout_keep.argtypes = [c_void_p, c_int64, c_int64, *dropout]
    for name in ("emu_float_to_half", "emu_float_to_bfloat16"):
        getattr(so, name).argtypes = [c_void_p, c_int64, c_void_p]
    so.emu_half_to_float.argtypes = [c_void_p, c_int64, c_void_p]
    return so


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _dropout_args(p, call_key, col_offset, total_f, training=True):
    k0, k1 = philox.seed_key(SEED)
    return (k0, k1, call_key & 0xFFFFFFFF, call_key >> 32, dropout_threshold(p) if training else 0,
            dropout_scale(p) if training else 1.0, col_offset, total_f)


def test_philox_matches_torch(emu):
    """The philox kernel over a grid-stride range equals the torch Philox4x32-10, word for word."""
    c = torch.randint(0, 2**32, (3000, 4), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    out = torch.empty(3000, 4, dtype=torch.int32)
    assert emu.emu_philox(_ptr(c.to(torch.int32)), 3000, 7, 0xDEADBEEF, _ptr(out)) == 0
    ref = torch.stack(philox.philox4x32(tuple(c[:, i] for i in range(4)), (7, 0xDEADBEEF)), 1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1), (0, 5), (3, 0), (5, 131), (2, 1024), (3, 2500)])
def test_mask_tokens_matches_reference(emu, shape, mode, dtype):
    """mask_kernel (rate by thread 0 through shared memory, several CUDA blocks per row, tails) is bit-exact."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, mode)).encode()))
    tokens = torch.randint(0, 50000, shape, generator=gen).to(dtype)
    index = torch.where(torch.arange(shape[0]) % 2 == 0, torch.randint(0, 1000, (shape[0],), generator=gen),
                        torch.randint(0, 2**40, (shape[0],), generator=gen) + 2**33)
    k0, k1 = philox.seed_key(SEED)
    for rate, eps, group, offset, mask_id in [(0.37, 1e-3, 0, 0, 3), (1.0, 0.0, 4, philox.EVAL_STREAM_OFFSET, 0),
                                              (0.0, 0.5, 3, 7, 1)]:
        ref = mask_tokens_reference(tokens, index, SEED, mode=mode, mask_token_id=mask_id, rate=rate, eps=eps,
                                    stratify_group=group, stream_offset=offset)
        ids, mask = torch.full_like(tokens, -1), torch.zeros(shape, dtype=torch.bool)
        weight, rates = torch.full(shape, float("nan")), torch.full((shape[0],), float("nan"))
        assert emu.emu_mask_tokens(32 if dtype == torch.int32 else 64, _ptr(tokens), _ptr(index), *shape, k0, k1,
                                   MODES.index(mode), rate, eps, group, offset, mask_id, _ptr(ids), _ptr(mask),
                                   _ptr(weight), _ptr(rates)) == 0
        assert torch.equal(ids, ref.input_ids)
        assert torch.equal(mask, ref.mask)
        assert torch.equal(weight, ref.weight)
        assert torch.equal(rates, ref.rate)


# (rows, F, col_offset, total_F): whole rows, odd F, and tensor-parallel shards not aligned to a Philox block
SHARDS = [(1, 1, 0, 1), (3, 7, 0, 7), (4, 300, 0, 300), (5, 33, 3, 70), (2, 17, 50, 67), (1, 1100, 1, 2203)]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shard", SHARDS)
def test_dropout_keep_mask_matches_reference(emu, shard, p):
    """keep_kernel reproduces the reference keep mask of a (possibly sharded) [rows, F] exactly."""
    rows, f, col_offset, total = shard
    call_key = 0x0123_4567_89AB_CDEF
    keep = torch.zeros(rows, f, dtype=torch.bool)
    assert emu.emu_dropout_keep(_ptr(keep), rows, f, *_dropout_args(p, call_key, col_offset, total)) == 0
    assert torch.equal(keep, dropout_keep_mask_reference(rows, f, p, call_key, SEED, col_offset, total))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shard", SHARDS)
def test_swiglu_dropout_forward_backward(emu, shard, p, dtype):
    """fwd_kernel / bwd_kernel equal the reference and its autograd (to rounding), with the same zeros."""
    rows, f, col_offset, total = shard
    call_key = (5 << 28) | 3
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shard, p)).encode()))
    x = (torch.randn(rows, 2 * f, generator=gen, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(rows, f, generator=gen, dtype=torch.float64).to(dtype)
    args = _dropout_args(p, call_key, col_offset, total)
    y, dx = torch.empty(rows, f, dtype=dtype), torch.empty(rows, 2 * f, dtype=dtype)
    assert emu.emu_swiglu_fwd(DTYPES[dtype], _ptr(x), _ptr(y), rows, f, *args) == 0
    assert emu.emu_swiglu_bwd(DTYPES[dtype], _ptr(x), _ptr(dy), _ptr(dx), rows, f, *args) == 0

    x64 = x.double().requires_grad_()
    y_ref = swiglu_dropout_reference(x64, p, call_key, SEED, True, col_offset, total)
    y_ref.backward(dy.double())
    keep = dropout_keep_mask_reference(rows, f, p, call_key, SEED, col_offset, total)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=tol, atol=tol * 4)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    a_grad, b_grad = dx[:, :f], dx[:, f:]
    assert torch.equal(a_grad[~keep], torch.zeros_like(a_grad[~keep]))
    assert torch.equal(b_grad[~keep], torch.zeros_like(b_grad[~keep]))


def test_emulated_half_and_bfloat16_round_like_torch(emu):
    """The emulation's float -> binary16 / bfloat16 conversions round exactly as torch does."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**32, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.99, 6.0e-8, 2.98e-8, 2.9802322e-08, 1e-10,
                            math.inf, -math.inf, 1 + 2**-11, 1 + 3 * 2**-11, 3.0e38], dtype=torch.float32)
    x = torch.cat([bits.view(torch.float32), special, torch.randn(10_000, generator=gen) * 1e-5])
    x = x[~torch.isnan(x)]
    for name, dt in (("emu_float_to_half", torch.float16), ("emu_float_to_bfloat16", torch.bfloat16)):
        out = torch.empty(x.numel(), dtype=torch.int16)
        getattr(emu, name)(_ptr(x), x.numel(), _ptr(out))
        assert torch.equal(out, x.to(dt).view(torch.int16)), name
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    back = torch.empty(h.numel(), dtype=torch.float32)
    emu.emu_half_to_float(_ptr(h), h.numel(), _ptr(back))
    ref = h.view(torch.float16).float()
    finite = ~torch.isnan(ref)
    assert torch.equal(back[finite], ref[finite]) and torch.isnan(back[~finite]).all()
