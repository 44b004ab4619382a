"""Attention with packed-document masks: FlexAttention's block masks vs sdpa with a dense boolean mask vs plain
causal sdpa (the baseline: no document mask), one attention call forward + backward, in one process.

    python benchmarks/bench_attention_masks.py                         # CPU: seq 1024 and 2048, ~8 documents
    python benchmarks/bench_attention_masks.py --device cuda --seq 4096 --heads 16 --groups 8 --head-dim 128 \\
        --batch 4 --dtype bf16                                         # the qwen3-0.6b shape on a GPU

Per configuration: tokens/s (median of the rounds, the three timed round-robin) and their ratio to plain causal
sdpa, the MiB the call keeps for backward (saved tensors) and the MiB of the mask it is given (sdpa's dense
[batch, 1, seq, seq] bool; flex's BlockMask).  On a GPU also the peak memory of the call.
"""

import argparse
import json
import statistics
import time
import warnings


def _saved_mib(fn) -> float:
    import torch

    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return total[0] / 2**20


def main() -> None:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--documents", type=int, default=8, help="documents per window (random lengths)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from megatron_dataeff.models.flex_attention import flex
    from megatron_dataeff.objectives.documents import DocumentFlags

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.device(args.device)
    results = []
    for seq in args.seq:
        b, n, g, d = args.batch, args.heads, args.groups, args.head_dim
        # ~`documents` documents a window: EODs at random places
        tokens = torch.randint(0, 255, (b, seq))
        for row in range(b):
            cuts = torch.randperm(seq - 2)[:args.documents - 1] + 1
            tokens[row, cuts] = 256
        flags = DocumentFlags(256, reset_attention_mask=True)
        dense = flags.attention_mask(tokens, causal=True).to(dev)  # True = masked out
        ids = (tokens == 256).to(torch.int32)
        ids = (ids.cumsum(-1) - ids).to(dev)

        def keep(bb, hh, qi, ki):
            return (ids[bb, qi] == ids[bb, ki]) & (ki <= qi)

        from torch.nn.attention.flex_attention import create_block_mask

        block = create_block_mask(keep, b, None, seq, seq, device=dev)
        q = torch.randn(b, n, seq, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, g, seq, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, g, seq, d, device=dev, dtype=dtype, requires_grad=True)
        scale = d ** -0.5
        gqa = {"enable_gqa": True} if g != n else {}
        calls = {
            "sdpa causal (no document mask)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     scale=scale, **gqa),
            "sdpa + dense document mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=~dense,
                                                                                 scale=scale, **gqa),
            "flex + block mask": lambda: flex(q, k, v, block, scale),
        }
        mask_mib = {"sdpa causal (no document mask)": 0.0,
                    "sdpa + dense document mask": dense.numel() * dense.element_size() / 2**20,
                    "flex + block mask": sum(t.numel() * t.element_size() for t in block.as_tuple()
                                             if isinstance(t, torch.Tensor)) / 2**20}
        times = {name: [] for name in calls}
        peak = {}
        for name, fn in calls.items():  # warm-up (and compilation on a GPU), saved bytes, peak
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            saved = _saved_mib(fn)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            times[name].append(saved)
        saved = {name: t.pop() for name, t in times.items()}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                q.grad = k.grad = v.grad = None
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn().float().sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["sdpa causal (no document mask)"])
        print(f"seq {seq}, batch {b}, {n} heads / {g} groups x {d}, {args.dtype}, {args.device}, "
              f"~{args.documents} documents a window")
        print(f"  {'attention':34s} {'tokens/s':>10s} {'vs causal':>9s} {'saved MiB':>10s} {'mask MiB':>9s}"
              + ("  peak MiB" if peak else ""))
        for name in calls:
            t = statistics.median(times[name])
            row = {"seq": seq, "attention": name, "tokens_per_s": b * seq / t, "ratio": base / t,
                   "saved_mib": saved[name], "mask_mib": mask_mib[name], "peak_mib": peak.get(name)}
            results.append(row)
            print(f"  {name:34s} {row['tokens_per_s']:10.0f} {row['ratio']:9.3f} {saved[name]:10.2f} "
                  f"{mask_mib[name]:9.2f}" + (f"  {peak[name]:8.0f}" if peak else ""))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
