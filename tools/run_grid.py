"""Run the paper's experiment grid (AR, token dropout, attention / MLP dropout, weight decay, masked
diffusion) on a fixed unique-token budget for many epochs, sequentially, resumably.

    python tools/run_grid.py --scale tiny --output runs/tiny_grid              # the whole grid, CPU
    python tools/run_grid.py --scale tiny --methods ar,mdm --seeds 1,2 --output runs/g
    python tools/run_grid.py --scale paper --output /ckpt/grid --dry-run        # print the commands
    python tools/plot_runs.py runs/tiny_grid                                    # plots + table

Each run is `pretrain_diffusion.py` in a subprocess (under torchrun at `--scale paper`, with
GPUS_PER_NODE / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT from the environment), writing
`{output}/{method}_s{seed}/` (metrics.jsonl, run.json, checkpoints/).  Its saved checkpoints are then
scored on the offline tasks (tools/evaluate.py --all-checkpoints -> downstream.jsonl).  A run whose
`complete.json` exists is skipped; an interrupted run resumes from its latest checkpoint.  Methods
and scales: megatron_dataeff/evaluation/grid.py.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_dataeff.evaluation.grid import METHODS, SCALES, run_flags, run_name  # noqa: E402


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
    grid_record = {"scale": args.scale, "methods": methods, "seeds": seeds, "unique_tokens":
                   args.unique_tokens or scale.unique_tokens, "epochs": args.epochs or scale.epochs,
                   "command": shlex.join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "tools/run_grid.py",
                                          *(argv if argv is not None else sys.argv[1:])])}
    if not args.dry_run:
        with open(os.path.join(args.output, "grid.json"), "w") as f:
            json.dump(grid_record, f, indent=2)
    extra = shlex.split(args.extra)
    num_examples = args.num_examples or scale.num_examples
    t_grid = time.time()
    failures = []
    for seed in seeds:
        for method in methods:
            run_dir = os.path.abspath(os.path.join(args.output, run_name(method, seed)))
            flags, facts = run_flags(scale, method, seed, run_dir, unique_tokens=args.unique_tokens,
                                     epochs=args.epochs, extra=extra)
            train_cmd = [*_launcher(scale), os.path.join(ROOT, "pretrain_diffusion.py"), *flags]
            eval_cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load",
                        os.path.join(run_dir, "checkpoints"), "--all-checkpoints", "--no-validation",
                        "--tasks", args.tasks, "--num-examples", str(num_examples),
                        "--mc-samples", str(scale.mc_samples), "--json"]
            if args.dry_run:
                print(shlex.join(train_cmd))
                if scale.downstream_evals and args.tasks:
                    print(shlex.join(eval_cmd))
                continue
            done_marker = os.path.join(run_dir, "complete.json")
            if os.path.exists(done_marker) and _final_valid(run_dir, facts["train_iters"]):
                print(f"[grid] {run_name(method, seed)}: complete, skipped", flush=True)
                continue
            os.makedirs(run_dir, exist_ok=True)
            print(f"[grid] {run_name(method, seed)}: training {facts['train_iters']} steps "
                  f"({facts['epochs']:g} epochs of {facts['unique_tokens']:,} tokens"
                  f"{', fresh-data reference' if facts['fresh_reference'] else ''})", flush=True)
            t0 = time.time()
            log = os.path.join(run_dir, "train.log")
            rc = _run(train_cmd, log, env)
            if rc != 0 or not _final_valid(run_dir, facts["train_iters"]):
                print(f"[grid] {run_name(method, seed)}: training failed (exit {rc}); see {log}", flush=True)
                failures.append(run_name(method, seed))
                continue
            t_train = time.time() - t0
            if scale.downstream_evals and args.tasks:
                out = subprocess.run(eval_cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if out.returncode != 0:
                    print(f"[grid] {run_name(method, seed)}: offline evaluation failed:\n{out.stderr[-2000:]}",
                          flush=True)
                    failures.append(run_name(method, seed))
                    continue
                with open(os.path.join(run_dir, "downstream.jsonl"), "w") as f:
                    f.write(out.stdout)
            facts.update(train_seconds=round(t_train, 1), total_seconds=round(time.time() - t0, 1))
            with open(done_marker, "w") as f:
                json.dump(facts, f, indent=2)
            print(f"[grid] {run_name(method, seed)}: done in {facts['total_seconds']:.0f}s "
                  f"(training {t_train:.0f}s)", flush=True)
    if not args.dry_run:
        print(f"[grid] finished in {time.time() - t_grid:.0f}s; {len(failures)} failed"
              f"{': ' + ', '.join(failures) if failures else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
