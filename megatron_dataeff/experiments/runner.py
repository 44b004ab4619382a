"""Run an experiment grid: each (method, seed) trained by pretrain_diffusion.py in a subprocess, resumably,
then its checkpoints scored on the offline tasks (tools/evaluate.py), on one node or several.

The command line is tools/run_grid.py (its docstring describes the grid directory and the phases); the
methods and scales are `experiments.grid`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_dataeff.atomic import write_text_atomic
from megatron_dataeff.errors import ConfigError
from megatron_dataeff.experiments.grid import METHODS, SCALES, run_flags, run_name

ROOT = str(Path(__file__).resolve().parents[2])  # the checkout: pretrain_diffusion.py and tools/


@dataclass
class GridArgs:
    """What tools/run_grid.py asks for (its flags)."""

    scale: str = "tiny"
    methods: Optional[list[str]] = None  # default: the scale's list
    seeds: list[int] = field(default_factory=lambda: [1234])
    output: str = "runs/grid"
    unique_tokens: Optional[int] = None
    epochs: Optional[float] = None
    downstream_evals: Optional[int] = None
    num_examples: Optional[int] = None
    tasks: str = "cloze,continuation"
    extra: str = ""
    threads: Optional[int] = None
    dry_run: bool = False


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


def run_grid(args: GridArgs, command: str = "") -> int:
    """Train and evaluate every run of the grid `args` describes; 0 when all succeeded, 1 otherwise.
    `command` is recorded in grid.json (how to regenerate the grid)."""
    scale = SCALES[args.scale]
    if args.downstream_evals is not None:
        scale.downstream_evals = args.downstream_evals
    methods = list(METHODS) if args.methods == ["all"] else (args.methods or scale.default_methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown methods {unknown}; known: {', '.join(METHODS)}")
    seeds = args.seeds
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
                   "command": command}
    if lead and not args.dry_run:
        write_text_atomic(os.path.join(args.output, "grid.json"), json.dumps(grid_record, indent=2))
    extra = shlex.split(args.extra)
    num_examples = args.num_examples or scale.num_examples
    evaluate = bool(scale.downstream_evals and args.tasks)
    t_grid = time.time()
    failures, trained = [], []

    if scale.seconds_per_step and not args.dry_run:
        todo = [(m, run_flags(scale, m, s, "", unique_tokens=args.unique_tokens, epochs=args.epochs)[1])
                for s in seeds for m in methods
                if not os.path.exists(os.path.join(args.output, run_name(m, s), "complete.json"))]
        seconds = sum(f["train_iters"] * scale.seconds_per_step * scale.cost(m) for m, f in todo)
        print(f"[grid] {len(todo)} of {len(methods) * len(seeds)} runs to train: about {seconds / 60:.0f} min on a "
              f"2-core CPU ({scale.seconds_per_step:g} s/step measured there; scale by your cores)"
              f"{', plus the offline evaluations' if evaluate else ''}", flush=True)

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
