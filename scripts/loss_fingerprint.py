"""The losses of a fixed set of short runs, to prove that a refactor changed no behaviour.

    python scripts/loss_fingerprint.py --output /tmp/after.json                        # this checkout
    python scripts/loss_fingerprint.py --root /path/to/old/checkout --output /tmp/before.json
    python scripts/loss_fingerprint.py --compare /tmp/before.json /tmp/after.json      # exit 1 unless bit-identical

Each run is `pretrain_diffusion.py` of ROOT (default: this checkout) in a subprocess on the CPU, 8 steps of a
tiny model on the embedded corpus, logging every step: AR with random-token span dropout and MLP dropout, MIR,
masked diffusion (stratified), dual, masked diffusion at TP=2 with sequence parallelism, AR at PP=2, and a resume
(save at step 4, resume to 8 in a second process).  Every train/valid record's loss, grad norm and named parts is
kept at full precision.  `--checkpoint-dir DIR` also keeps the resume run's checkpoints there, so a checkpoint
written by the old checkout can be loaded by the new one (`--resume-from DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--unique-tokens", "60000", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "2",
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0", "--train-iters", "8",
        "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "2", "--device", "cpu", "--seed", "7",
        "--tensorboard-dir", ""]

RUNS: dict[str, tuple[int, list[str]]] = {  # name -> (processes, flags)
    "ar_td_random_span_mlp": (1, ["--token-dropout-rate", "0.3", "--token-dropout-noise", "random",
                                  "--token-dropout-span", "3", "--mlp-dropout", "0.1"]),
    "ar_mir_anneal": (1, ["--token-dropout-rate", "0.5", "--token-dropout-anneal", "linear",
                          "--token-dropout-aux-weight", "0.5"]),
    "mdm_stratified": (1, ["--objective", "mdm", "--mdm-stratified", "--attention-dropout", "0.1"]),
    "dual": (1, ["--objective", "dual", "--ar-fraction", "0.5"]),
    "mdm_tp2_sp": (2, ["--objective", "mdm", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ar_pp2_td_uniform": (2, ["--pipeline-model-parallel-size", "2", "--token-dropout-rate", "1.0",
                              "--token-dropout-schedule", "uniform"]),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root: Path, nproc: int, flags: list[str], run_dir: str) -> list[dict]:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}"]
    cmd += [str(root / "pretrain_diffusion.py"), *BASE, *flags, "--run-dir", run_dir]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{run_dir}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    keep = ("iteration", "split", "loss", "grad_norm", "lr", "view", "consumed_samples")
    records = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            records.append({k: v for k, v in sorted(r.items())
                            if k in keep or k.startswith("loss_") or k.startswith("val_")})
    return records


def fingerprint(root: Path, checkpoint_dir: str | None, resume_from: str | None) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nproc, flags) in RUNS.items():
            print(f"[fingerprint] {name}", file=sys.stderr, flush=True)
            out[name] = _train(root, nproc, flags, os.path.join(tmp, name))
        # resume: steps 1-4 saved at 4, then a second process resumes to 8
        ckpt = checkpoint_dir or os.path.join(tmp, "resume_ckpt")
        shutil.rmtree(ckpt, ignore_errors=True)
        flags = ["--objective", "mdm", "--save", ckpt, "--save-interval", "4"]
        print("[fingerprint] resume", file=sys.stderr, flush=True)
        first = _train(root, 1, [*flags, "--exit-interval", "4"], os.path.join(tmp, "resume_a"))
        second = _train(root, 1, [*flags, "--load", ckpt], os.path.join(tmp, "resume_b"))
        out["resume"] = first + second
        if resume_from:
            copy = os.path.join(tmp, "resume_from")
            shutil.copytree(resume_from, copy)
            print("[fingerprint] resume from the given checkpoints", file=sys.stderr, flush=True)
            out["resume_from_given"] = _train(root, 1, ["--objective", "mdm", "--load", copy, "--save", copy],
                                              os.path.join(tmp, "resume_c"))
    return out


def compare(a: dict, b: dict) -> list[str]:
    """Differences between two fingerprints (runs in both), as lines."""
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append(f"{name}: only in {'the first' if name in a else 'the second'}")
        elif a[name] != b[name]:
            for i, (x, y) in enumerate(zip(a[name], b[name])):
                if x != y:
                    diffs.append(f"{name}: record {i} differs: {x} vs {y}")
                    break
            else:
                diffs.append(f"{name}: {len(a[name])} vs {len(b[name])} records")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT), help="the checkout whose pretrain_diffusion.py runs")
    p.add_argument("--output", help="write the fingerprint (JSON) here")
    p.add_argument("--checkpoint-dir", help="keep the resume run's checkpoints here")
    p.add_argument("--resume-from", help="also resume (mdm, to step 8) from a copy of these checkpoints")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprints instead of running")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.load(open(path)) for path in args.compare)
        diffs = compare(a, b)
        print("\n".join(diffs) if diffs else f"bit-identical: {len(set(a) & set(b))} runs")
        return 1 if diffs else 0
    result = fingerprint(Path(args.root).resolve(), args.checkpoint_dir, args.resume_from)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
