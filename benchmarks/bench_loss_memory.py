"""Memory and time of the loss on the paper's vocabulary: the chunked vocab-parallel cross entropy vs
megatron-core's (which casts the logits to fp32 and keeps the fp32 softmax for backward).

    python benchmarks/bench_loss_memory.py                      # vocab 151,936, 4096 tokens, bf16 logits
    python benchmarks/bench_loss_memory.py --tokens 8192 --fused # also megatron's fused kernel (torch.compile)

Each variant runs forward + backward of the loss alone on bf16 logits [tokens, 1, vocab] in a fresh
process (CPU) and reports its peak memory above the logits themselves: the growth of the process's
max RSS, with glibc told to return every large block at once (MALLOC_MMAP_THRESHOLD_) so that RSS
follows live memory.  On a GPU the same script reports torch.cuda.max_memory_allocated instead.
The ratios compare each variant with megatron-core's unchunked loss measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("megatron", "chunked")


def _child(variant: str, tokens: int, vocab: int, device: str) -> dict:
    import resource

    import torch

    from megatron_dataeff.distributed import initialize

    initialize(1, 1, seed=0, device_flag=device)
    torch.manual_seed(0)
    # filled in slices: a full fp32 temporary would set the max RSS before the measurement starts
    logits = torch.empty(tokens, 1, vocab, dtype=torch.bfloat16, device=device)
    for start in range(0, tokens, 256):
        logits[start:start + 256] = torch.randn(min(256, tokens - start), 1, vocab, device=device) * 2
    logits.requires_grad_(True)
    target = torch.randint(0, vocab, (tokens, 1), device=device)
    if variant == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as fn
    elif variant == "fused":
        from megatron.core import parallel_state
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        def fn(x, t):
            return fused_vocab_parallel_cross_entropy(x, t, parallel_state.get_tensor_model_parallel_group())
    else:
        from megatron_dataeff.models.cross_entropy import chunked_vocab_parallel_cross_entropy

        def fn(x, t):
            return chunked_vocab_parallel_cross_entropy(x, t, None)

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    if variant == "fused":  # compile outside the measured region
        small = logits[:8].detach().clone().requires_grad_(True)
        fn(small, target[:8]).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss()
    t0 = time.perf_counter()
    loss = fn(logits, target)
    loss.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss() - base
    seconds = time.perf_counter() - t0
    return {"variant": variant, "peak_bytes": peak, "seconds": seconds, "loss": float(loss.float().mean()),
            "logits_bytes": logits.numel() * logits.element_size()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens (sequence x micro-batch) of the loss")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary rows of one tensor-parallel rank")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fused", action="store_true", help="also megatron-core's fused cross entropy (torch.compile)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.vocab, args.device)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for variant in VARIANTS + (("fused",) if args.fused else ()):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--device", args.device],
                             env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    gib = 2**30
    print(f"loss memory: {args.tokens} tokens x vocab {args.vocab:,}, bf16 logits "
          f"({base['logits_bytes'] / gib:.2f} GiB), {args.device}; peak above the logits "
          f"({'max_memory_allocated' if args.device == 'cuda' else 'max RSS growth'})")
    print("| loss | peak GiB | vs megatron | seconds | mean loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_bytes'] / gib:.2f} | {r['peak_bytes'] / base['peak_bytes']:.2f} | "
              f"{r['seconds']:.2f} | {r['loss']:.6f} |")
    saved = base["peak_bytes"] - rows[1]["peak_bytes"]
    print(f"chunked saves {saved / gib:.2f} GiB ({saved / args.tokens / 1024:.0f} KiB per token) against "
          f"megatron-core's loss; per sample of 4096 tokens: {saved / args.tokens * 4096 / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
