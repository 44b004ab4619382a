"""GPU check of the CUDA kernels: bit-exact vs the CPU kernel / torch reference, then throughput vs HBM.

    bash benchmarks/gpu_check.sh          # builds megatron_dataeff._C_cuda, then runs this

Prints PASS/FAIL per check and GB/s (fraction of --hbm-gbs, default H200 4800 GB/s); exits 1 on a FAIL.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_dataeff.ops import _extension, philox  # noqa: E402
from megatron_dataeff.ops.masking import mask_tokens, mask_tokens_reference  # noqa: E402
from megatron_dataeff.ops.swiglu_dropout import (  # noqa: E402
    dropout_keep_mask, dropout_keep_mask_reference, swiglu_dropout, swiglu_dropout_reference,
)

FAILED = []


def check(name, ok):
    print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if not ok:
        FAILED.append(name)


def bench(fn, iters=50):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hbm-gbs", type=float, default=4800.0)
    args = ap.parse_args()
    print("implementations:", _extension.implementation("cuda"), _extension.implementation("cpu"))
    if _extension.implementation("cuda") != "cuda":
        sys.exit("megatron_dataeff._C_cuda is not built or no GPU is visible")
    dev = torch.device("cuda")
    seed, key = 0x1234_5678_9ABC, 0x0123_4567_89AB_CDEF

    c = torch.randint(0, 2**32, (1000, 4), dtype=torch.int64)
    ref = torch.stack(philox.philox4x32(tuple(c[:, i] for i in range(4)), (7, 9)), 1)
    with torch.cuda.device(dev):
        got = _extension.cuda_module().philox4x32(c.to(dev), 7, 9, _extension.cuda_stream(dev))
    check("philox cuda == torch", torch.equal(got.cpu(), ref))

    gen = torch.Generator().manual_seed(0)
    for mode in ("mdm", "fixed", "uniform"):
        for dtype in (torch.int32, torch.int64):
            for shape, group in (((1, 1), 0), ((7, 1000), 4), ((300, 2049), 0), ((4096, 3), 64)):
                tok = torch.randint(0, 50000, shape, generator=gen).to(dtype)
                idx = torch.randint(0, 2**45, (shape[0],), generator=gen)
                kw = dict(mode=mode, mask_token_id=5, rate=0.4, eps=1e-3, stratify_group=group)
                r = mask_tokens_reference(tok, idx, seed, **kw)
                g = mask_tokens(tok.to(dev), idx.to(dev), seed, **kw)
                ok = all(torch.equal(getattr(g, n).cpu(), getattr(r, n)) for n in ("input_ids", "mask", "weight", "rate"))
                check(f"mask_tokens cuda == reference {mode} {dtype} {shape} G={group}", ok)

    for rows, f, off, tot in ((5, 37, 0, None), (64, 4096, 4096, 16384), (3, 10, 2**33, 2**34)):
        r = dropout_keep_mask_reference(rows, f, 0.3, key, seed, off, tot)
        g = dropout_keep_mask(rows, f, 0.3, key, seed, off, tot, device=dev)
        check(f"dropout keep mask cuda == reference {rows}x{f} offset {off}", torch.equal(g.cpu(), r))

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)):
        x = torch.randn(129, 2 * 333, dtype=dtype)
        dy = torch.randn(129, 333, dtype=dtype)
        xr, xg = x.clone().requires_grad_(), x.to(dev).requires_grad_()
        yr = swiglu_dropout_reference(xr, 0.25, key, seed)
        yr.backward(dy)
        yg = swiglu_dropout(xg, 0.25, key, seed)
        yg.backward(dy.to(dev))
        same_zeros = torch.equal(yg.cpu() == 0, yr == 0)
        close = torch.allclose(yg.cpu().double(), yr.double(), rtol=tol, atol=tol) and torch.allclose(
            xg.grad.cpu().double(), xr.grad.double(), rtol=tol, atol=tol)
        check(f"swiglu_dropout cuda vs reference {dtype}: same dropped positions, close values/grads", same_zeros and close)

    b, s = 64, 8192
    tok = torch.randint(0, 50000, (b, s), device=dev)
    idx = torch.arange(b, device=dev)
    ms = bench(lambda: mask_tokens(tok, idx, seed, mode="mdm", mask_token_id=5))
    nbytes = b * s * (8 + 8 + 1 + 4)
    print(f"mask_tokens {b}x{s} int64: {ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s "
          f"({nbytes / ms / 1e6 / args.hbm_gbs:.0%} of HBM)")
    x = torch.randn(16384, 2 * 14336, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(16384, 14336, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: swiglu_dropout(x, 0.1, key, seed), iters=20)
    nbytes = x.numel() * 2 + dy.numel() * 2
    print(f"swiglu_dropout fwd {tuple(x.shape)} bf16: {ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s "
          f"({nbytes / ms / 1e6 / args.hbm_gbs:.0%} of HBM)")
    xg = x.requires_grad_()
    ms_fb = bench(lambda: swiglu_dropout(xg, 0.1, key, seed).backward(dy), iters=10)
    print(f"swiglu_dropout fwd+bwd: {ms_fb:.3f} ms")
    if FAILED:
        sys.exit(f"{len(FAILED)} check(s) failed")
    print("all checks passed")


if __name__ == "__main__":
    main()
