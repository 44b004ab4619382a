"""The paper's model on one device: qwen3-0.6b at sequence 4096 in bf16, the largest micro-batch that fits,
for each attention backend with and without recomputation; tokens/s, TFLOP/s, MFU and peak memory from
our real trainer.

    python benchmarks/bench_paper_model.py                                # on a GPU (H200: goal MFU >= 45%)
    python benchmarks/bench_paper_model.py --attention-backends sdpa --recompute none,selective,full
    python benchmarks/bench_paper_model.py --quick                        # CPU smoke run of the same flow

Each (attention backend, recompute) variant runs in its own process: it tries micro-batch sizes from the largest candidate
down (default: the memory estimate's largest that fits in 92% of the device, and twice that) and keeps
the first that trains without running out of memory.  A run is `--accumulation` micro-batches per
optimizer step on a random-token dataset (NullTokenizer, vocabulary padded to Qwen3's 151,936), the
first `--warmup` steps untimed (torch.compile of the fusions, cuDNN/cuBLAS autotuning).  The figures
are the trainer's own `metrics.jsonl` fields (model FLOPs by Megatron-LM's formula; MFU against
`--peak-tflops` or the device's dense bf16 peak; CUDA peak allocated / reserved).  Prints a markdown
table and one JSON line; --json-out writes the rows and the figures ({name, value, goal, pass}; the
best MFU is judged against --mfu-goal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

QWEN3_ROWS = 151936
RECOMPUTE = {
    "none": [],
    "selective": ["--recompute-granularity", "selective"],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
}
QUICK = dict(preset="tiny", seq_length=256, vocab_rows=1024, steps=2, warmup=1, accumulation=2)


def _trainer_argv(a, mbs: int, data: str, run_dir: str, variant: str) -> list[str]:
    backend, recompute = variant.split(":")
    from megatron_dataeff.data.synthetic import null_tokenizer_vocab

    argv = ["--model-preset", a.preset, "--seq-length", str(a.seq_length), "--micro-batch-size", str(mbs),
            "--global-batch-size", str(mbs * a.accumulation), "--train-iters", str(a.warmup + a.steps),
            "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "0", "--lr", "3e-4",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(null_tokenizer_vocab(a.vocab_rows)),
            "--data-path", data, "--run-dir", run_dir, "--tensorboard-dir", "", "--device", a.device,
            "--attention-backend", backend, *RECOMPUTE[recompute]]
    if a.bf16:
        argv.append("--bf16")
    if a.peak_tflops:
        argv += ["--peak-tflops", str(a.peak_tflops)]
    return argv


def _estimated_fit(a, variant: str) -> int | None:
    """The largest power-of-two micro-batch the memory estimate fits in 92% of the device, if it can say."""
    try:
        import torch

        from megatron_dataeff.arguments import build_parser, config_from_args
        from megatron_dataeff.training.memory import estimate_memory
    except ImportError:
        return None
    if a.device != "cuda":
        return None
    capacity = torch.cuda.get_device_properties(0).total_memory * 0.92
    best = None
    for mbs in (1, 2, 4, 8, 16, 32, 64):
        cfg = config_from_args(build_parser().parse_args(_trainer_argv(a, mbs, "x", "x", variant)))
        cfg.validate_layout(1)
        if estimate_memory(cfg, 1, a.vocab_rows, "cuda").total > capacity:
            break
        best = mbs
    return best


def child(a) -> dict:
    """One recompute variant: the largest candidate micro-batch that trains; its figures."""
    import gc

    import torch

    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.data.synthetic import null_tokenizer_vocab, write_random_dataset
    from megatron_dataeff.training.loop import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_paper_")
    data = write_random_dataset(os.path.join(tmp, "random"), null_tokenizer_vocab(a.vocab_rows),
                                num_docs=max(8, 2 * a.accumulation * 16), doc_tokens=a.seq_length * 8)
    tried = []
    for mbs in sorted(set(a.candidates), reverse=True):
        run_dir = os.path.join(tmp, f"mb{mbs}")
        trainer = None
        try:
            cfg = config_from_args(build_parser().parse_args(_trainer_argv(a, mbs, data, run_dir, a.child)))
            trainer = Trainer(cfg)
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
        except torch.cuda.OutOfMemoryError:
            tried.append({"micro_batch_size": mbs, "result": "out of memory"})
            continue
        finally:
            if trainer is not None:
                trainer.close()
            del trainer
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
        recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        timed = [r for r in recs if r["split"] == "train"][a.warmup:]

        def mean(key):
            vals = [r[key] for r in timed if key in r]
            return sum(vals) / len(vals) if vals else None

        backend, recompute = a.child.split(":")
        return {"attention": backend, "recompute": recompute, "micro_batch_size": mbs, "tokens_per_s": mean("tokens_per_s"),
                "tflops_per_device": mean("tflops_per_device"), "mfu": mean("mfu"),
                "mem_allocated_gib": timed[-1].get("mem_allocated_gib"),
                "mem_reserved_gib": timed[-1].get("mem_reserved_gib"), "max_rss_gib": timed[-1].get("max_rss_gib"),
                "ms_per_step": mean("ms_per_step"), "loss": timed[-1]["loss"], "tried": tried}
    backend, recompute = a.child.split(":")
    return {"attention": backend, "recompute": recompute, "micro_batch_size": None, "tried": tried}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--vocab-rows", type=int, default=QWEN3_ROWS, help="padded vocabulary of the model")
    p.add_argument("--recompute", default="none,selective", help=f"comma-separated: {', '.join(RECOMPUTE)}")
    p.add_argument("--micro-batch-sizes", default="auto", help="candidates, e.g. 2,4,8 (auto: from the estimate)")
    p.add_argument("--attention-backends", default="sdpa,local", help="comma-separated --attention-backend values")
    p.add_argument("--mfu-goal", type=float, default=0.45, help="the best variant's MFU must reach this")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="tiny model on any device: checks the flow")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--candidates", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        a.candidates = [int(x) for x in a.candidates.split(",")]
        print("BENCH_PAPER_MODEL " + json.dumps(child(a)), flush=True)
        return 0
    rows = []
    for recompute in a.recompute.split(","):
        if recompute not in RECOMPUTE:
            p.error(f"--recompute: {recompute!r} is not one of {', '.join(RECOMPUTE)}")
    variants = [f"{b}:{r}" for b in a.attention_backends.split(",") for r in a.recompute.split(",")]
    for variant in variants:
        if a.micro_batch_sizes != "auto":
            candidates = [int(x) for x in a.micro_batch_sizes.split(",")]
        else:
            fit = _estimated_fit(a, variant)
            candidates = [1, 2] if fit is None else [fit, 2 * fit] + ([fit // 2] if fit > 1 else [])
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--child", variant, "--candidates", ",".join(map(str, candidates)), "--device", a.device]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_PAPER_MODEL ")]
        if proc.returncode != 0 or not lines:
            print(f"{variant}: the run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            backend, recompute = variant.split(":")
            rows.append({"attention": backend, "recompute": recompute, "error": proc.stderr[-500:]})
            continue
        row = json.loads(lines[-1][len("BENCH_PAPER_MODEL "):])
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
    print(f"{a.preset}, seq {a.seq_length}, {'bf16' if a.bf16 else 'fp32'}, {a.device}, "
          f"{a.accumulation} micro-batches per step")
    print("| attention | recompute | micro-batch | tokens/s | TFLOP/s | MFU | peak allocated GiB | peak reserved GiB | "
          "tried |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("micro_batch_size") is None:
            print(f"| {r['attention']} | {r['recompute']} | - | - | - | - | - | - | {r.get('tried') or r.get('error')} |")
            continue

        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"| {r['attention']} | {r['recompute']} | {r['micro_batch_size']} | {f('tokens_per_s', ',.0f')} | "
              f"{f('tflops_per_device', '.1f')} | {mfu} | {f('mem_allocated_gib', '.1f')} | "
              f"{f('mem_reserved_gib', '.1f')} | {', '.join(str(t['micro_batch_size']) + ': OOM' for t in r['tried'])} |")
    figures = []
    for r in rows:
        label = f"{a.preset} seq {a.seq_length} {r['attention']} recompute {r['recompute']}"
        if r.get("micro_batch_size") is None:
            figures.append({"name": f"{label}: trains at some micro-batch", "value": False, "goal": "trains",
                            "pass": False, "unit": ""})
            continue
        for key, unit in (("micro_batch_size", ""), ("tokens_per_s", "tokens/s"), ("tflops_per_device", "TFLOP/s"),
                          ("mfu", ""), ("mem_allocated_gib", "GiB"), ("mem_reserved_gib", "GiB")):
            if r.get(key) is not None:
                figures.append({"name": f"{label}: {key}", "value": r[key], "goal": None, "pass": None, "unit": unit})
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    if mfus:
        figures.append({"name": f"{a.preset} seq {a.seq_length}: best MFU", "value": max(mfus),
                        "goal": f">= {a.mfu_goal}", "pass": max(mfus) >= a.mfu_goal, "unit": ""})
    summary = {"preset": a.preset, "seq_length": a.seq_length, "device": a.device, "rows": rows, "figures": figures}
    print(json.dumps(summary))
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0 if all(r.get("micro_batch_size") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
