"""Run the paper's experiment grid (AR, token dropout, attention / MLP dropout, weight decay, masked
diffusion) on a fixed unique-token budget for many epochs, sequentially, resumably.

    python tools/run_grid.py --scale tiny --output runs/tiny_grid              # the whole grid, CPU
    python tools/run_grid.py --scale tiny --methods ar,mdm --seeds 1,2 --output runs/g
    python tools/run_grid.py --scale paper --output /ckpt/grid --dry-run        # print the commands
    python tools/plot_runs.py runs/tiny_grid                                    # plots + table

Each run is `pretrain_diffusion.py` in a subprocess (under torchrun at `--scale paper`, with
GPUS_PER_NODE / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT from the environment), writing
`{output}/{method}_s{seed}/` (metrics.jsonl, run.json, checkpoints/).  When every run is trained, the
saved checkpoints are scored on the offline tasks (tools/evaluate.py --all-checkpoints ->
downstream.jsonl), then `complete.json` is written.  A run whose `complete.json` exists is skipped; a
trained run is not trained again; an interrupted run resumes from its latest checkpoint.

On several nodes (the same command on each, output on a shared filesystem) every node takes part in the
training; only node 0 (NODE_RANK=0) writes grid.json and runs the evaluations and the other nodes
stop after the training phase, so no file is written twice and no node waits on another's evaluation at
a rendezvous.  Nodes other than 0 log to train.node{N}.log.  Methods and scales:
megatron_dataeff/experiments/grid.py.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from megatron_dataeff.experiments.grid import METHODS, SCALES, run_flags, run_name
from megatron_dataeff.atomic import write_text_atomic


def _final_valid(run_dir: str, train_iters: int) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("split") == "valid" and r.get("iteration") == train_iters:
                return True
    return False


def _launcher(scale) -> list[str]:
    if not scale.distributed:
        return [sys.executable]
    env = os.environ
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={env.get('GPUS_PER_NODE', '8')}", f"--nnodes={env.get('NNODES', '1')}",
            f"--node_rank={env.get('NODE_RANK', '0')}", f"--master_addr={env.get('MASTER_ADDR', 'localhost')}",
            f"--master_port={env.get('MASTER_PORT', '6000')}"]


def _run(cmd: list[str], log_path: str, env: dict) -> int:
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, default: the scale's list. Known: {','.join(METHODS)}")
    p.add_argument("--seeds", default="1234", help="comma-separated seeds")
    p.add_argument("--output", default="runs/grid", help="grid directory")
    p.add_argument("--unique-tokens", type=int, default=None, help="override the scale's budget")
    p.add_argument("--epochs", type=float, default=None, help="override the scale's epochs")
    p.add_argument("--downstream-evals", type=int, default=None,
                   help="checkpoints per run scored on the offline tasks (0 = none)")
    p.add_argument("--num-examples", type=int, default=None, help="offline task examples")
    p.add_argument("--tasks", default="cloze,continuation")
    p.add_argument("--extra", default="", help="more pretrain_diffusion.py flags for every run (quoted)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of CPU runs (default: all cores)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)

    scale = SCALES[args.scale]
    if args.downstream_evals is not None:
        scale.downstream_evals = args.downstream_evals
    methods = args.methods.split(",") if args.methods else scale.default_methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    os.makedirs(args.output, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not scale.distributed:
        env.setdefault("OMP_NUM_THREADS", str(args.threads or os.cpu_count() or 1))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
    node_rank = int(os.environ.get("NODE_RANK", "0")) if scale.distributed else 0
    lead = node_rank == 0
    grid_record = {"scale": args.scale, "methods": methods, "seeds": seeds, "unique_tokens":
                   args.unique_tokens or scale.unique_tokens, "epochs": args.epochs or scale.epochs,
                   "command": shlex.join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "tools/run_grid.py",
                                          *(argv if argv is not None else sys.argv[1:])])}
    if lead and not args.dry_run:
        write_text_atomic(os.path.join(args.output, "grid.json"), json.dumps(grid_record, indent=2))
    extra = shlex.split(args.extra)
    num_examples = args.num_examples or scale.num_examples
    evaluate = bool(scale.downstream_evals and args.tasks)
    t_grid = time.time()
    failures, trained = [], []

    # Phase 1, every node: train each run that has not reached its last step.
    for seed in seeds:
        for method in methods:
            name = run_name(method, seed)
            run_dir = os.path.abspath(os.path.join(args.output, name))
            flags, facts = run_flags(scale, method, seed, run_dir, unique_tokens=args.unique_tokens,
                                     epochs=args.epochs, extra=extra)
            train_cmd = [*_launcher(scale), os.path.join(ROOT, "pretrain_diffusion.py"), *flags]
            if args.dry_run:
                print(shlex.join(train_cmd))
                if evaluate:
                    print(shlex.join(_eval_cmd(args, scale, run_dir, num_examples)))
                continue
            if os.path.exists(os.path.join(run_dir, "complete.json")) and _final_valid(run_dir, facts["train_iters"]):
                print(f"[grid] {name}: complete, skipped", flush=True)
                continue
            if _final_valid(run_dir, facts["train_iters"]):
                print(f"[grid] {name}: trained, not trained again", flush=True)
                trained.append((name, run_dir, facts))
                continue
            os.makedirs(run_dir, exist_ok=True)
            print(f"[grid] {name}: training {facts['train_iters']} steps "
                  f"({facts['epochs']:g} epochs of {facts['unique_tokens']:,} tokens"
                  f"{', fresh-data reference' if facts['fresh_reference'] else ''})", flush=True)
            t0 = time.time()
            log = os.path.join(run_dir, "train.log" if lead else f"train.node{node_rank}.log")
            rc = _run(train_cmd, log, env)
            if rc != 0 or not _final_valid(run_dir, facts["train_iters"]):
                print(f"[grid] {name}: training failed (exit {rc}); see {log}", flush=True)
                failures.append(name)
                continue
            print(f"[grid] {name}: trained in {time.time() - t0:.0f}s", flush=True)
            if lead:
                write_text_atomic(os.path.join(run_dir, "training.json"),
                                  json.dumps({"train_seconds": round(time.time() - t0, 1)}))
            trained.append((name, run_dir, facts))

    # Phase 2, node 0 only: score the trained runs' checkpoints, then mark them complete.
    if lead and not args.dry_run:
        for name, run_dir, facts in trained:
            t0 = time.time()
            if evaluate:
                out = subprocess.run(_eval_cmd(args, scale, run_dir, num_examples), capture_output=True, text=True,
                                     env=env, cwd=ROOT)
                if out.returncode != 0:
                    print(f"[grid] {name}: offline evaluation failed:\n{out.stderr[-2000:]}", flush=True)
                    failures.append(name)
                    continue
                write_text_atomic(os.path.join(run_dir, "downstream.jsonl"), out.stdout)
            timing = _read_json(os.path.join(run_dir, "training.json"))
            facts.update(train_seconds=timing.get("train_seconds"), eval_seconds=round(time.time() - t0, 1))
            write_text_atomic(os.path.join(run_dir, "complete.json"), json.dumps(facts, indent=2))
            print(f"[grid] {name}: complete (evaluation {facts['eval_seconds']:.0f}s)", flush=True)
    if not args.dry_run:
        print(f"[grid] {'node ' + str(node_rank) + ': ' if not lead else ''}finished in {time.time() - t_grid:.0f}s; "
              f"{len(failures)} failed{': ' + ', '.join(failures) if failures else ''}", flush=True)
    return 1 if failures else 0


def _eval_cmd(args, scale, run_dir: str, num_examples: int) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", os.path.join(run_dir, "checkpoints"),
            "--all-checkpoints", "--no-validation", "--tasks", args.tasks, "--num-examples", str(num_examples),
            "--mc-samples", str(scale.mc_samples), "--json"]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}

if __name__ == "__main__":
    sys.exit(main())
