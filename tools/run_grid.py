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
import os
import shlex
import sys

from megatron_dataeff.entry import tool_main
from megatron_dataeff.experiments.grid import METHODS, SCALES
from megatron_dataeff.experiments.runner import ROOT, GridArgs, run_grid


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, or all; default: the scale's list. Known: {','.join(METHODS)}")
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

    grid = GridArgs(scale=args.scale, methods=args.methods.split(",") if args.methods else None,
                    seeds=[int(s) for s in args.seeds.split(",") if s], output=args.output,
                    unique_tokens=args.unique_tokens, epochs=args.epochs, downstream_evals=args.downstream_evals,
                    num_examples=args.num_examples, tasks=args.tasks, extra=args.extra, threads=args.threads,
                    dry_run=args.dry_run)
    command = shlex.join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "tools/run_grid.py",
                          *(argv if argv is not None else sys.argv[1:])])
    return run_grid(grid, command)


if __name__ == "__main__":
    sys.exit(main())
