"""GPU check of the CUDA kernels: bit-exact against the torch references, then speed against the device's
measured copy bandwidth.

    bash benchmarks/gpu_check.sh                       # builds megatron_dataeff._C_cuda, then runs this
    python benchmarks/gpu_check.py --json /tmp/kernels.json

Exits 2 when no GPU is visible, 1 when `_C_cuda` is not what the dispatcher uses (a failed build) or a
check fails.  Every figure goes to --json as {name, value, goal, pass} (the summary reads it):

* bit-exact: Philox, token masking (ids, mask, weights, rates; 3 modes x int32/int64 x odd shapes, and
  rows beyond 2^31 flattened elements compared row by row with the reference), the dropout keep mask
  (column offsets past 2^32), SwiGLU + dropout (same dropped positions; values and gradients to
  rounding; rows past 2^31 elements);
* speed: a device-to-device copy measured here (bytes read + written) is the ceiling; token masking of
  256 x 32768 int64 must reach >= 70% of it; SwiGLU + dropout forward and backward against the plain
  torch composition (time, and bytes saved for backward).  Inputs rotate over buffers several times
  larger than the L2 cache, indices stay on the host (no device sync), gradients are reset between
  iterations, timing is by CUDA events.
"""

import argparse
import json
import sys
from pathlib import Path


import torch

from megatron_dataeff.ops import extension, philox
from megatron_dataeff.ops.masking import mask_tokens, mask_tokens_reference
from megatron_dataeff.ops.swiglu_dropout import (
    dropout_keep_mask, dropout_keep_mask_reference, swiglu_dropout, swiglu_dropout_reference,
)

L2_BYTES = 60 * 2**20  # H200; buffers rotate over several times this
SEED, KEY = 0x1234_5678_9ABC, 0x0123_4567_89AB_CDEF
FIGURES: list[dict] = []


def record(name, value, goal=None, ok=None, unit=""):
    """One figure of the summary; `ok` None means reported, not judged."""
    FIGURES.append({"name": name, "value": value, "goal": goal, "pass": ok, "unit": unit})
    status = "" if ok is None else ("PASS  " if ok else "FAIL  ")
    shown = f"{value:.4g}" if isinstance(value, float) else value
    print(f"{status}{name}: {shown}{(' ' + unit) if unit else ''}{f'  (goal {goal})' if goal else ''}", flush=True)


def check(name, ok):
    record(name, bool(ok), "bit-exact", bool(ok))


def cuda_time_ms(fn, iters, before=None):
    """Mean ms of fn() over `iters` calls, by CUDA events; `before(i)` runs untimed-ish between calls
    (its launch is inside the window, so keep it to a cheap reset)."""
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        if before is not None:
            before(i)
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _rotation(nbytes_one: int) -> int:
    return max(2, -(-4 * L2_BYTES // max(1, nbytes_one)))


def copy_bandwidth(dev) -> float:
    """Device-to-device copy, GB/s counting bytes read + written (the ceiling for streaming kernels)."""
    n = 512 * 2**20  # bytes per buffer
    src = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(2)]
    dst = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(2)]
    ms = cuda_time_ms(lambda i: dst[i % 2].copy_(src[(i + 1) % 2]), 40)
    return 2 * n / ms / 1e6


def exactness(dev) -> None:
    c = torch.randint(0, 2**32, (1000, 4), dtype=torch.int64)
    ref = torch.stack(philox.philox4x32(tuple(c[:, i] for i in range(4)), (7, 9)), 1)
    with torch.cuda.device(dev):
        got = extension.cuda_module().philox4x32(c.to(dev), 7, 9, extension.cuda_stream(dev))
    check("philox cuda == torch", torch.equal(got.cpu(), ref))

    gen = torch.Generator().manual_seed(0)
    fields = ("input_ids", "mask", "weight", "rate")
    ok = True
    for mode in ("mdm", "fixed", "uniform"):
        for dtype in (torch.int32, torch.int64):
            for shape, group in (((1, 1), 0), ((7, 1000), 4), ((300, 2049), 0), ((4096, 3), 64), ((5, 65537), 0)):
                tok = torch.randint(0, 50000, shape, generator=gen).to(dtype)
                idx = torch.randint(0, 2**45, (shape[0],), generator=gen)
                kw = dict(mode=mode, mask_token_id=5, rate=0.4, eps=1e-3, stratify_group=group)
                r = mask_tokens_reference(tok, idx, SEED, **kw)
                g = mask_tokens(tok.to(dev), idx, SEED, **kw)
                same = all(torch.equal(getattr(g, n).cpu(), getattr(r, n)) for n in fields)
                if not same:
                    print(f"  mismatch: mask_tokens {mode} {dtype} {shape} G={group}")
                ok &= same
    check("mask_tokens cuda == reference (3 modes x 2 dtypes x 5 shapes)", ok)

    # beyond 2^31 flattened elements: 65600 x 32768 int32 (8.6 GB); rows compared with the reference
    rows, seq = 65600, 32768
    tok = torch.randint(0, 50000, (rows, seq), dtype=torch.int32, device=dev)
    idx = torch.arange(rows, dtype=torch.int64) + 3
    g = mask_tokens(tok, idx, SEED, mode="mdm", mask_token_id=5)
    pick = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1])
    r = mask_tokens_reference(tok[pick.to(dev)].cpu(), idx[pick], SEED, mode="mdm", mask_token_id=5)
    same = all(torch.equal(getattr(g, n)[pick.to(dev)].cpu(), getattr(r, n)) for n in fields)
    check(f"mask_tokens cuda == reference past 2^31 elements ({rows}x{seq}, rows {pick.tolist()})", same)
    del tok, g

    ok = True
    for rows, f, off, tot in ((5, 37, 0, None), (64, 4096, 4096, 16384), (3, 10, 2**33, 2**34)):
        r = dropout_keep_mask_reference(rows, f, 0.3, KEY, SEED, off, tot)
        g = dropout_keep_mask(rows, f, 0.3, KEY, SEED, off, tot, device=dev)
        ok &= torch.equal(g.cpu(), r)
    check("dropout keep mask cuda == reference (offsets up to 2^33)", ok)

    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)):
        x = torch.randn(129, 2 * 333, dtype=dtype)
        dy = torch.randn(129, 333, dtype=dtype)
        xr, xg = x.clone().requires_grad_(), x.to(dev).requires_grad_()
        yr = swiglu_dropout_reference(xr, 0.25, KEY, SEED)
        yr.backward(dy)
        yg = swiglu_dropout(xg, 0.25, KEY, SEED)
        yg.backward(dy.to(dev))
        same_zeros = torch.equal(yg.cpu() == 0, yr == 0)
        close = torch.allclose(yg.cpu().double(), yr.double(), rtol=tol, atol=tol) and torch.allclose(
            xg.grad.cpu().double(), xr.grad.double(), rtol=tol, atol=tol)
        ok &= same_zeros and close
    check("swiglu_dropout cuda vs reference (fp32/bf16/fp64): same dropped positions, values to rounding", ok)

    # past 2^31 output elements: [262144, 2 x 8200] bf16; rows compared with the reference
    rows, f = 262144, 8200
    x = torch.randn(rows, 2 * f, dtype=torch.bfloat16, device=dev)
    y = swiglu_dropout(x, 0.1, KEY, SEED)
    pick = torch.tensor([0, rows // 2, rows - 1])
    keep = dropout_keep_mask(rows, f, 0.1, KEY, SEED, device=dev)[pick.to(dev)].cpu()
    ref_keep = dropout_keep_mask_reference(rows, f, 0.1, KEY, SEED)[pick]
    check(f"swiglu_dropout keep mask past 2^31 elements ({rows}x{f})",
          torch.equal(keep, ref_keep) and torch.equal(y[pick.to(dev)].cpu() == 0, ~ref_keep))
    del x, y


def speed(dev, copy_gbs: float) -> None:
    record("device-to-device copy (read + write)", copy_gbs, unit="GB/s")
    b, s = 256, 32768
    per_call = b * s * (8 + 8 + 1 + 4)  # tokens read; ids, mask (bool), weights written (rates: b floats)
    n = _rotation(per_call)
    toks = [torch.randint(0, 50000, (b, s), device=dev) for _ in range(n)]
    idx = torch.arange(b, dtype=torch.int64) + 10**6  # on the host: the index check costs no device sync
    ms = cuda_time_ms(lambda i: mask_tokens(toks[i % n], idx, SEED, mode="mdm", mask_token_id=5), 30)
    gbs = per_call / ms / 1e6
    record(f"mask_tokens {b}x{s} int64, fraction of measured copy bandwidth", gbs / copy_gbs, ">= 0.70",
           gbs / copy_gbs >= 0.70)
    record(f"mask_tokens {b}x{s} int64", gbs, unit="GB/s")
    del toks

    rows, f = 16384, 14336
    xs = [torch.randn(rows, 2 * f, device=dev, dtype=torch.bfloat16, requires_grad=True)
          for _ in range(_rotation(rows * 2 * f * 2))]
    dy = torch.randn(rows, f, device=dev, dtype=torch.bfloat16)

    def torch_swiglu(x):
        a, u = torch.chunk(x, 2, dim=-1)
        return torch.nn.functional.dropout(torch.nn.functional.silu(a) * u, 0.1)

    def reset(i):
        xs[i % len(xs)].grad = None

    for name, fn in (("fused", lambda x: swiglu_dropout(x, 0.1, KEY, SEED)), ("torch", torch_swiglu)):
        with torch.no_grad():
            fwd = cuda_time_ms(lambda i: fn(xs[i % len(xs)]), 20)
        fb = cuda_time_ms(lambda i: fn(xs[i % len(xs)]).backward(dy), 10, before=reset)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn(xs[0])
        record(f"swiglu_dropout {name} forward {rows}x{2 * f} bf16", fwd, unit="ms")
        record(f"swiglu_dropout {name} forward+backward", fb, unit="ms")
        record(f"swiglu_dropout {name} bytes saved for backward", sum(saved) / 2**20, unit="MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU visible (torch.cuda.is_available() is False): run this on a machine with a GPU",
              file=sys.stderr)
        return 2
    impl = extension.implementation("cuda")
    record("kernel implementation on cuda", impl, "cuda", impl == "cuda")
    if impl != "cuda":
        print(f"megatron_dataeff._C_cuda is not in use: {extension.load_error('cuda')}", file=sys.stderr)
    else:
        dev = torch.device("cuda")
        exactness(dev)
        speed(dev, copy_bandwidth(dev))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "figures": FIGURES}, indent=2))
    failed = [f["name"] for f in FIGURES if f["pass"] is False]
    print(f"{len(failed)} check(s) failed" if failed else "all kernel checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
