"""Training on a GPU, end to end: what only a GPU machine can show about the training path.

    python benchmarks/gpu_train_check.py --out /tmp/gpu_train --json /tmp/train.json   # on a GPU machine
    python benchmarks/gpu_train_check.py --device cpu --iters 6                        # the flow, on a CPU

Each check is a real `pretrain_diffusion.py` run (tiny preset, embedded corpus), its run folder under --out:
  1. bf16 on the device, MLP dropout on, for ar, ar + token dropout and mdm: the loss falls; the run
     record says the fused kernels ran ("kernels": "cuda") and which attention; ms/step.
  2. Resume on the device: the mdm run of 1 again as N/2 steps saved + N/2 resumed (bf16, hidden, attention
     and MLP dropout on): the losses must equal the uninterrupted run's exactly.
  3. Device vs CPU from one start: the same fp32 run (token dropout + MLP dropout, whose noise is keyed per
     sample / element; no hidden or attention dropout, whose masks come from each device's generator) with
     --use-cpu-initialization on the device, so both begin from the CPU generator's weights, and the CPU run
     with the GPU hidden (CUDA_VISIBLE_DEVICES=""); the largest relative loss difference over 10 steps must
     be <= 1e-3 (fp32 matmuls reduce in another order on the device).
  4. Packed documents (--reset-position-ids --reset-attention-mask --eod-mask-loss, mdm, bf16 on the device, 10
     steps): what `auto` takes there (transformer-engine's packed sequences, THD, where transformer-engine imports;
     FlexAttention's block masks otherwise) against sdpa with the dense document mask, from one start: the
     largest relative loss difference must be <= 2e-2 (bf16: two attention kernels round apart); the start-up
     choice is recorded.
Every figure goes to --json as {name, value, goal, pass}.  Exits 1 when a run fails or a goal is missed, 2
when --device cuda finds no GPU.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model-preset", "tiny", "--seq-length", "128", "--micro-batch-size", "16", "--global-batch-size", "16",
        "--unique-tokens", "400000", "--lr", "2e-3", "--lr-warmup-iters", "5", "--lr-decay-style", "cosine",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "0", "--seed", "1234", "--tensorboard-dir", ""]
DROPOUT = ["--mlp-dropout", "0.1", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
DEVICE_VS_CPU_TOLERANCE = 1e-3
FIGURES: list[dict] = []


def record(name, value, goal=None, ok=None, unit=""):
    FIGURES.append({"name": name, "value": value, "goal": goal, "pass": ok, "unit": unit})
    status = "" if ok is None else ("PASS  " if ok else "FAIL  ")
    shown = f"{value:.4g}" if isinstance(value, float) else value
    print(f"{status}{name}: {shown}{(' ' + unit) if unit else ''}{f'  (goal {goal})' if goal else ''}", flush=True)


def _run(args: list[str], run_dir: Path, device: str, hide_gpu: bool = False) -> dict:
    """Train losses, ms/step, the run record and seconds of one pretrain_diffusion.py run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(ROOT / "pretrain_diffusion.py"), *BASE, *args, "--run-dir", str(run_dir),
           "--device", device]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    return {"losses": [r["loss"] for r in train], "ms": [r["ms_per_step"] for r in train],
            "run": json.loads((run_dir / "run.json").read_text()), "seconds": time.time() - t0}


def _max_diff(a: list[float], b: list[float], relative: bool = False) -> float:
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) / (abs(y) if relative else 1.0) for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the flow")
    ap.add_argument("--iters", type=int, default=40, help="training steps of each run (even)")
    ap.add_argument("--out", default=None, help="directory for the run folders (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no GPU visible (torch.cuda.is_available() is False): run this on a machine with a GPU",
                  file=sys.stderr)
            return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_train_check_"))
    out.mkdir(parents=True, exist_ok=True)
    n, half = args.iters, args.iters // 2
    iters = ["--train-iters", str(n), "--lr-decay-iters", str(n)]
    bf16 = ["--bf16"] if args.device == "cuda" else []
    kernels = "cuda" if args.device == "cuda" else None
    failed = []

    def judge(name, value, goal, ok, unit=""):
        record(name, value, goal, ok, unit)
        if not ok:
            failed.append(name)

    mdm_flags = iters + bf16 + DROPOUT + ["--objective", "mdm"]
    runs = {"ar": iters + bf16 + ["--objective", "ar", "--mlp-dropout", "0.1"],
            "ar + token dropout 0.3": iters + bf16 + ["--objective", "ar", "--token-dropout-rate", "0.3",
                                                       "--mlp-dropout", "0.1"],
            "mdm": mdm_flags}
    results = {}
    for name, flags in runs.items():
        try:
            r = results[name] = _run(flags, out / name.replace(" ", "_").replace("+", "plus"), args.device)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            judge(f"{name}: trains", False, "runs", False)
            continue
        losses = r["losses"]
        k = max(1, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        finite = all(math.isfinite(x) for x in losses)
        judge(f"{name}: loss falls ({'bf16' if bf16 else 'fp32'}, {n} steps)", f"{first:.4f} -> {last:.4f}",
              "last fifth below first fifth, finite", finite and last < first)
        compute = r["run"].get("compute", {})
        if kernels:
            judge(f"{name}: fused kernels ran on the device", compute.get("kernels"), kernels,
                  compute.get("kernels") == kernels)
        record(f"{name}: attention", compute.get("attention"))
        record(f"{name}: ms per step (median)", sorted(r["ms"])[len(r["ms"]) // 2], unit="ms")

    ckpt = out / "resume_ckpt"
    try:
        _run(mdm_flags + ["--train-iters", str(half), "--save", str(ckpt)], out / "resume_first", args.device)
        resumed = _run(mdm_flags + ["--load", str(ckpt)], out / "resume_second", args.device)["losses"]
        straight = results["mdm"]["losses"][half:] if "mdm" in results else []
        judge(f"resume on {args.device}: max |loss difference| over steps {half + 1}..{n}",
              _max_diff(resumed, straight), "== 0 (exact)", _max_diff(resumed, straight) == 0.0)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        judge("resume: runs", False, "runs", False)

    fp32 = ["--train-iters", "10", "--lr-decay-iters", "10", "--objective", "ar", "--token-dropout-rate", "0.3",
            "--mlp-dropout", "0.1", "--use-cpu-initialization"]
    try:
        dev = _run(fp32, out / "fp32_device", args.device)["losses"]
        cpu = _run(fp32, out / "fp32_cpu", "cpu", hide_gpu=True)["losses"]
        diff = _max_diff(dev, cpu, relative=True)
        judge(f"{args.device} vs CPU from one start: max relative loss difference over 10 fp32 steps", diff,
              f"<= {DEVICE_VS_CPU_TOLERANCE}", diff <= DEVICE_VS_CPU_TOLERANCE)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        judge("device vs CPU: runs", False, "runs", False)

    docs = ["--train-iters", "10", "--lr-decay-iters", "10", "--objective", "mdm", "--reset-position-ids",
            "--reset-attention-mask", "--eod-mask-loss", *bf16]
    docs_tolerance = 2e-2 if bf16 else 1e-3
    try:
        auto = _run(docs, out / "docs_auto", args.device)
        dense = _run(docs + ["--attention-backend", "sdpa"], out / "docs_sdpa", args.device)
        record("packed documents: auto's attention", auto["run"].get("compute", {}).get("attention"))
        diff = _max_diff(auto["losses"], dense["losses"], relative=True)
        judge(f"packed documents: auto vs sdpa's dense document mask, max relative loss difference over 10 "
              f"{'bf16' if bf16 else 'fp32'} steps", diff, f"<= {docs_tolerance:g}", diff <= docs_tolerance)
        for name, r in (("auto", auto), ("sdpa, dense mask", dense)):
            record(f"packed documents, {name}: ms per step (median)", sorted(r["ms"])[len(r["ms"]) // 2], unit="ms")
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        judge("packed documents: runs", False, "runs", False)

    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "iters": n, "figures": FIGURES}, indent=2))
    print(f"{len(failed)} training check(s) failed: {failed}" if failed else "all training checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
