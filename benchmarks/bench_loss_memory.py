"""Memory and time of the loss on the paper's vocabulary: the chunked vocab-parallel cross entropy vs
megatron-core's (which casts the logits to fp32 and keeps the fp32 softmax for backward).

    python benchmarks/bench_loss_memory.py                      # vocab 151,936, 4096 tokens, bf16 logits
    python benchmarks/bench_loss_memory.py --tokens 8192 --fused # also megatron's fused kernel (torch.compile)
    python benchmarks/bench_loss_memory.py --sizes 2048x32000,4096x151936 --dtype fp32   # several sizes
    python benchmarks/bench_loss_memory.py --hidden 1024 --tokens 8192   # output layer + loss, Cut Cross-Entropy too

With several sizes, one row per size: time (median of --rounds forward + backward after a warm-up) and
memory of each loss, the chunked loss's time over megatron's, and the share of an 80 GB GPU its fp32 logits
take (what `models/loss_choice.py` decides by: megatron's loss up to 1/16).

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
LINEAR_VARIANTS = ("megatron", "chunked", "cce")  # --hidden: the output layer and the loss together


def _child_linear(variant: str, tokens: int, vocab: int, hidden: int, device: str, dtype: str) -> dict:
    """The output layer and the loss (forward + backward) from its input [tokens, 1, hidden] and weight [vocab,
    hidden]: logits then megatron's or the chunked loss, or Cut Cross-Entropy's fused linear loss (no logits on
    GPUs); peak above the inputs (a GPU figure for cce: on CPUs its compile warm-up has set the max RSS first)."""
    import resource

    import torch

    from megatron_dataeff.distributed import initialize
    from megatron_dataeff.models import cross_entropy

    initialize(1, 1, seed=0, device_flag=device)
    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    x = (torch.randn(tokens, 1, hidden, device=device) / 4).to(dt).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dt).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens, 1), device=device)

    def run():
        if variant == "cce":
            return cross_entropy.linear_cross_entropy(x, w, target.transpose(0, 1))
        logits = x @ w.t()
        if variant == "megatron":
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
            return vocab_parallel_cross_entropy(logits, target)
        return cross_entropy.chunked_vocab_parallel_cross_entropy(logits, target, None)

    if variant == "cce":  # compile outside the measured region
        run().sum().backward()
        x.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = run()
    loss.float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "peak_bytes": peak, "seconds": time.perf_counter() - t0,
            "loss": float(loss.float().mean())}


def _child(variant: str, tokens: int, vocab: int, device: str, dtype: str = "bf16", rounds: int = 1) -> dict:
    import resource

    import torch

    from megatron_dataeff.distributed import initialize

    initialize(1, 1, seed=0, device_flag=device)
    torch.manual_seed(0)
    # filled in slices: a full fp32 temporary would set the max RSS before the measurement starts
    logits = torch.empty(tokens, 1, vocab, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device)

    def fill(x):
        for start in range(0, tokens, 256):
            x[start:start + 256] = torch.randn(min(256, tokens - start), 1, vocab, device=device) * 2
        return x

    fill(logits).requires_grad_(True)
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
    times = [time.perf_counter() - t0]
    mean = float(loss.float().mean())
    for _ in range(rounds):  # the first pass above is the warm-up when rounds > 1
        del loss
        logits.grad = None
        with torch.no_grad():  # fresh logits: the chunked loss's backward writes its gradient over them
            x = fill(logits.detach()).requires_grad_(True)
        t0 = time.perf_counter()
        loss = fn(x, target)
        loss.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = times[0] if rounds <= 1 else sorted(times[1:])[len(times[1:]) // 2]
    return {"variant": variant, "peak_bytes": peak, "seconds": seconds, "loss": mean,
            "logits_bytes": logits.numel() * logits.element_size()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens (sequence x micro-batch) of the loss")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary rows of one tensor-parallel rank")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fused", action="store_true", help="also megatron-core's fused cross entropy (torch.compile)")
    p.add_argument("--sizes", default=None, help="TOKENSxVOCAB,... : a table of several sizes (time and memory)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the logits' dtype")
    p.add_argument("--rounds", type=int, default=None, help="timed passes after a warm-up (default 1 pass, or 3 "
                   "with --sizes)")
    p.add_argument("--hidden", type=int, default=None, help="measure the output layer and the loss together from "
                   "its input of this width (variants megatron, chunked, cce: Cut Cross-Entropy's fused linear loss)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rounds = args.rounds if args.rounds is not None else (3 if args.sizes else 1)
    if args.child and args.hidden:
        print(json.dumps(_child_linear(args.child, args.tokens, args.vocab, args.hidden, args.device, args.dtype)))
        return 0
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.vocab, args.device, args.dtype, rounds)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")

    def measure(variant: str, tokens: int, vocab: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(tokens),
                              "--vocab", str(vocab), "--device", args.device, "--dtype", args.dtype,
                              "--rounds", str(rounds)], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    gib = 2**30
    if args.hidden:
        rows = []
        for variant in LINEAR_VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                                  "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--device", args.device,
                                  "--dtype", args.dtype], env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"| {variant} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:100]} |")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"output layer + loss: {args.tokens} tokens x hidden {args.hidden} x vocab {args.vocab:,}, {args.dtype}, "
              f"{args.device}; peak above the inputs")
        print("| variant | peak GiB | seconds | mean loss |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['peak_bytes'] / gib:.2f} | {r['seconds']:.3f} | {r['loss']:.6f} |")
        return 0
    if args.sizes:
        h100 = 81559 * 2**20  # an 80 GB GPU's memory, as torch reports it
        print(f"loss time and memory, {args.dtype} logits, {args.device}, median of {rounds} passes "
              f"(forward + backward); peak above the logits")
        print("| tokens | vocab | fp32 logits GiB | share of 80 GB | megatron s | chunked s | chunked / megatron "
              "| megatron peak GiB | chunked peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size in args.sizes.split(","):
            tokens, vocab = (int(x) for x in size.lower().split("x"))
            meg, chunked = measure("megatron", tokens, vocab), measure("chunked", tokens, vocab)
            fp32 = 4 * tokens * vocab
            print(f"| {tokens} | {vocab:,} | {fp32 / gib:.2f} | {fp32 / h100:.1%} | {meg['seconds']:.3f} | "
                  f"{chunked['seconds']:.3f} | {chunked['seconds'] / meg['seconds']:.2f} | "
                  f"{meg['peak_bytes'] / gib:.2f} | {chunked['peak_bytes'] / gib:.2f} |")
        return 0
    rows = [measure(variant, args.tokens, args.vocab) for variant in VARIANTS + (("fused",) if args.fused else ())]
    base = rows[0]
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
