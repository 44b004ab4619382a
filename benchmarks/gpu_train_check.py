"""Training on a GPU, end to end: what only a GPU machine can show about the training path.

    python benchmarks/gpu_train_check.py --out /tmp/gpu_train        # on a machine with a GPU
    python benchmarks/gpu_train_check.py --device cpu --iters 6      # a dry run of the same flow on CPU

Each check is a real `pretrain_diffusion.py` run (tiny preset, embedded corpus):
  1. ar, mdm and ar + MLP dropout (the fused kernel) train in bf16 on the device; the loss falls; ms/iter.
  2. Run-to-run: the same bf16 run twice; the largest loss difference (0 when deterministic).
  3. Resume: N steps straight vs N/2 saved + N/2 resumed, bf16 with dropout; the largest loss difference.
  4. Device independence: the same fp32 run on the device and on the CPU (same data, masks and dropout
     stream); the largest relative loss difference.
Prints one line per check and ends with one JSON line (also written to --out/gpu_train_check.json).
Exits 1 when a run fails or a loss is not finite; the differences are reported, not judged.
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
        "--unique-tokens", "400000", "--epochs", "4", "--lr", "2e-3", "--lr-warmup-iters", "5",
        "--lr-decay-style", "cosine", "--log-interval", "1", "--eval-iters", "0", "--seed", "1234"]
DROPOUT = ["--mlp-dropout", "0.1", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _run(args: list[str], run_dir: Path, device: str) -> tuple[list[float], float]:
    """(train losses, seconds) of one pretrain_diffusion.py run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "pretrain_diffusion.py"), *BASE, *args, "--run-dir", str(run_dir),
           "--device", device]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"], seconds


def _max_diff(a: list[float], b: list[float], relative: bool = False) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) / (abs(y) if relative else 1.0) for x, y in zip(a, b)), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the flow")
    ap.add_argument("--iters", type=int, default=60, help="training steps of each run (even)")
    ap.add_argument("--out", default=None, help="directory for the runs and the JSON (default: a temp dir)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_train_check_"))
    out.mkdir(parents=True, exist_ok=True)
    n, half = args.iters, args.iters // 2
    iters = ["--train-iters", str(n), "--lr-decay-iters", str(n)]
    bf16 = ["--bf16"] if args.device == "cuda" else []
    result, failed = {"device": args.device, "iters": n}, []

    def finite(name, losses):
        ok = bool(losses) and all(math.isfinite(x) for x in losses)
        if not ok:
            failed.append(name)
        return ok

    for name, extra in (("ar", ["--objective", "ar"]), ("mdm", ["--objective", "mdm"]),
                        ("ar_mlp_dropout", ["--objective", "ar", "--mlp-dropout", "0.1"])):
        losses, seconds = _run(iters + bf16 + extra, out / name, args.device)
        finite(name, losses)
        k = max(1, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        result[name] = dict(first_loss=first, last_loss=last, seconds=round(seconds, 1))
        print(f"{name:>15}: loss {first:.4f} -> {last:.4f} ({'falls' if last < first else 'DOES NOT FALL'}), "
              f"{seconds:.1f} s for {n} steps (with start-up)", flush=True)
        if not last < first:
            failed.append(f"{name} loss does not fall")

    flags = iters + bf16 + DROPOUT + ["--objective", "mdm"]
    a, _ = _run(flags, out / "repeat_a", args.device)
    b, _ = _run(flags, out / "repeat_b", args.device)
    result["run_to_run_max_abs_diff"] = _max_diff(a, b)
    print(f"{'run to run':>15}: max |loss diff| {result['run_to_run_max_abs_diff']:.3g} over {n} steps", flush=True)

    ckpt = out / "resume_ckpt"
    _run(flags + ["--train-iters", str(half), "--save", str(ckpt)], out / "resume_first", args.device)  # last flag wins
    resumed, _ = _run(flags + ["--load", str(ckpt)], out / "resume_second", args.device)
    finite("resume", resumed)
    result["resume_max_abs_diff"] = _max_diff(resumed, a[half:])
    print(f"{'resume':>15}: max |loss diff| {result['resume_max_abs_diff']:.3g} over steps {half + 1}..{n}", flush=True)

    fp32 = ["--train-iters", "10", "--lr-decay-iters", "10", "--objective", "mdm", "--mlp-dropout", "0.1"]
    dev, _ = _run(fp32, out / "fp32_device", args.device)
    cpu, _ = _run(fp32, out / "fp32_cpu", "cpu")
    result["device_vs_cpu_max_rel_diff"] = _max_diff(dev, cpu, relative=True)
    print(f"{'device vs cpu':>15}: max relative loss diff {result['device_vs_cpu_max_rel_diff']:.3g} "
          f"over 10 fp32 steps", flush=True)

    result["failed"] = failed
    (out / "gpu_train_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
