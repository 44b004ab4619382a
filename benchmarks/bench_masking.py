"""Fused token masking (csrc/) vs the torch code one would write without it.

    python benchmarks/bench_masking.py                      # batch 8 x 4096 and larger, CPU
    python benchmarks/bench_masking.py --device cuda --json

The baseline is the naive composition (torch.rand per sample and per token, compare, torch.where for
the ids, the 1/p weights), not the Philox reference.  Times are medians over --iters calls (min also
printed: this machine may be shared).  Goal on CPU: fused >= 4x faster at 8 x 4096.
"""

import argparse
import json
import statistics
import time


import torch

from megatron_dataeff.ops import extension
from megatron_dataeff.ops.masking import mask_tokens

MASK, EPS, SEED = 32000, 1e-3, 1234


def naive(tokens, gen):
    """mdm masking in plain torch: t ~ U(0,1) per sample, u ~ U(0,1) per token, ids/mask/weight/rate."""
    b, s = tokens.shape
    t = torch.rand(b, generator=gen, device=tokens.device)
    p = (1 - EPS) * t + EPS
    mask = torch.rand(b, s, generator=gen, device=tokens.device) < p[:, None]
    ids = torch.where(mask, torch.full((), MASK, dtype=tokens.dtype, device=tokens.device), tokens)
    weight = torch.where(mask, (1.0 / p)[:, None], torch.zeros((), device=tokens.device))
    return ids, mask, weight, p


def _time(fn, iters, sync):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="8x4096,32x4096,8x32768", help="comma-separated BATCHxSEQ")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the first shape's figures")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    impl = extension.implementation(device)
    print(f"masking: {impl}   device: {device}   threads: {torch.get_num_threads()}")
    print(f"{'shape':>10} {'naive torch ms':>15} {'fused ms':>10} {'speedup':>8}   (medians; min in brackets)")
    results = []
    for shape in args.shapes.split(","):
        b, s = (int(v) for v in shape.split("x"))
        tokens = torch.randint(0, MASK, (b, s), device=device)
        index = torch.arange(b, device=device) + 10**6
        gen = torch.Generator(device=device).manual_seed(0)
        ref_ms, ref_min = _time(lambda: naive(tokens, gen), args.iters, sync)
        fused_ms, fused_min = _time(lambda: mask_tokens(tokens, index, SEED, mode="mdm", eps=EPS, mask_token_id=MASK),
                                    args.iters, sync)
        print(f"{shape:>10} {ref_ms:9.3f} [{ref_min:.3f}] {fused_ms:7.3f} [{fused_min:.3f}] {ref_ms / fused_ms:7.2f}x")
        results.append(dict(shape=shape, reference_ms=ref_ms, fused_ms=fused_ms, speedup=ref_ms / fused_ms))
    if args.json:
        print(json.dumps(dict(implementation=impl, device=str(device), threads=torch.get_num_threads(),
                              **results[0], all=results)))


if __name__ == "__main__":
    main()
