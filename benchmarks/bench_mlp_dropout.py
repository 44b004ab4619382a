"""Fused SwiGLU + dropout (csrc/) vs torch (silu(a) * b, then nn.functional.dropout): time and memory.

    python benchmarks/bench_mlp_dropout.py                        # CPU, float32
    python benchmarks/bench_mlp_dropout.py --device cuda --dtype bfloat16 --tokens 16384 --ffn 14336

Times forward+backward (medians over --iters).  Memory is what autograd keeps for backward (bytes of
the distinct tensors saved, via saved_tensors_hooks) and, on CUDA, the peak allocated during forward.
"""

import argparse
import statistics
import time


import torch
import torch.nn.functional as F

from megatron_dataeff.ops import extension
from megatron_dataeff.ops.swiglu_dropout import swiglu_dropout


def torch_mlp(x, p):
    a, b = torch.chunk(x, 2, dim=-1)
    return F.dropout(F.silu(a) * b, p, training=True)


def fused_mlp(x, p):
    return swiglu_dropout(x, p, call_key=1, seed=1234)


def saved_bytes(fn, x, p):
    """Bytes of the distinct storages autograd saves for backward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, p)
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=4096, help="rows (batch x sequence)")
    ap.add_argument("--ffn", type=int, default=1024, help="F: x is [tokens, 2F]")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(args.tokens, 2 * args.ffn, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.ffn, device=device, dtype=dtype)
    print(f"swiglu_dropout: {extension.implementation(device)}   x: [{args.tokens}, {2 * args.ffn}] {args.dtype}"
          f"   p={args.p}   threads: {torch.get_num_threads()}")
    rows = {}
    for name, fn in (("torch", torch_mlp), ("fused", fused_mlp)):
        def step():
            fn(x, args.p).backward(dy)
            x.grad = None
        for _ in range(3):
            step()
        times = []
        for _ in range(args.iters):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            y = fn(x, args.p)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            del y
        rows[name] = (statistics.median(times), min(times), saved_bytes(fn, x, args.p) / 2**20, peak)
        peak_s = f"   forward peak {peak:8.1f} MiB" if peak is not None else ""
        print(f"{name:>6}: fwd+bwd {rows[name][0]:8.2f} ms (min {rows[name][1]:.2f})   saved for backward "
              f"{rows[name][2]:8.1f} MiB{peak_s}")
    t, f = rows["torch"], rows["fused"]
    print(f"ratio torch/fused: time {t[0] / f[0]:.2f}x   saved memory {t[2] / f[2]:.2f}x"
          + (f"   forward peak {t[3] / f[3]:.2f}x" if t[3] else ""))


if __name__ == "__main__":
    main()
