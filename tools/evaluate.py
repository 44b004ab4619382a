"""Evaluate a checkpoint: validation NLL (AR) or ELBO (masked diffusion) with its standard error,
and the offline downstream-style tasks built from the validation documents.

    python tools/evaluate.py --load runs/mdm/checkpoints --mc-samples 32 --tasks cloze,continuation --json

Diffusion models: the validation ELBO uses --val-mc-samples (default: --mc-samples) Monte-Carlo
samples per window with stratified mask rates; multiple-choice answers are scored with the
Monte-Carlo ELBO of the answer given the context (--method mc, --mc-samples 32-128), the exact
ELBO (--method exact, short answers) or the chain rule (--method chain, one forward per token).
Cloze accuracy decodes a diffusion model's masked answer one token per step, most confident
position first (--greedy-order confidence, LLaDA's order) or left to right (--greedy-order l2r).
`--json` prints one JSON line (val_loss, val_loss_stderr, tokens, <task>_acc, ...).
"""

import argparse
import json
import math
import os
import sys

from megatron_dataeff.entry import tool_main
from megatron_dataeff.objectives import DualObjective


@tool_main(process_group=True)  # a process group this call starts is torn down; a caller's is left alone
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="a --save directory (latest checkpoint) or one iter_N dir")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--mc-samples", type=int, default=32, help="diffusion: Monte-Carlo samples per answer")
    p.add_argument("--val-mc-samples", type=int, default=None, help="diffusion: samples per validation window")
    p.add_argument("--method", choices=["mc", "exact", "chain"], default="mc",
                   help="diffusion answer likelihood: MC ELBO, exact ELBO, or chain rule")
    p.add_argument("--greedy-order", choices=["confidence", "l2r"], default="confidence",
                   help="diffusion cloze decoding: most confident masked position first, or left to right")
    p.add_argument("--eval-windows", type=int, default=None, help="validation windows (default: all)")
    p.add_argument("--no-validation", action="store_true", help="skip the validation loss")
    p.add_argument("--tasks", default="", help="comma-separated offline tasks: cloze,continuation")
    p.add_argument("--num-examples", type=int, default=200, help="examples per offline task")
    p.add_argument("--task-seed", type=int, default=1234, help="seed of the offline tasks' construction")
    p.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX or WEIGHT PREFIX ... as pretrain_diffusion.py's (default: the checkpoint's own, "
                        "every dataset of a blend)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="evaluate every iter_N under --load (one JSON line each with --json)")
    p.add_argument("--view", choices=DualObjective.evaluation_views, default=None,
                   help="a dual-objective checkpoint: score the tasks as a causal LM (ar, default) or a diffusion "
                        "model (mdm); its validation reports both")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    from megatron_dataeff.evaluation.checkpoint_eval import evaluate_checkpoint
    from megatron_dataeff.checkpoint.format import checkpoint_iterations
    from megatron_dataeff.errors import PathNotFoundError

    tasks = [t for t in args.tasks.split(",") if t]
    if args.all_checkpoints:
        targets = [(args.load, it) for it in checkpoint_iterations(args.load)]
        if not targets:
            raise PathNotFoundError(f"no iter_N checkpoints under {args.load}")
    else:
        targets = [(args.load, args.iteration)]
    for path, iteration in targets:
        res = evaluate_checkpoint(path, iteration=iteration, tasks=tasks, mc_samples=args.mc_samples,
                                  val_mc_samples=args.val_mc_samples, eval_windows=args.eval_windows,
                                  num_examples=args.num_examples, task_seed=args.task_seed,
                                  data_path=args.data_path, batch_size=args.batch_size,
                                  validation=not args.no_validation, method=args.method,
                                  greedy_order=args.greedy_order, view=args.view)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            _print(res, tasks)
    return 0


def _print(res: dict, tasks) -> None:
    print(f"checkpoint {res['checkpoint']} (iteration {res['iteration']}, {res['objective']})")
    if "val_loss" in res:
        label = "validation ELBO" if res["kind"] == "elbo" else "validation NLL"
        extra = f", {res['mc_samples']} MC samples/window" if res["kind"] == "elbo" else ""
        print(f"  {label}: {res['val_loss']:.4f} ± {res['val_loss_stderr']:.4f} nats/token "
              f"(ppl {math.exp(min(res['val_loss'], 50)):.2f}; {res['windows']} windows, {res['tokens']} tokens{extra})")
        if "val_loss_mdm" in res:
            print(f"  validation ELBO (the dual model as a diffusion model): {res['val_loss_mdm']:.4f} ± "
                  f"{res['val_loss_stderr_mdm']:.4f} nats/token")
    if "greedy_order" in res:
        print(f"  greedy decoding order: {res['greedy_order']}")
    for t in tasks:
        keys = sorted(k for k in res if k.startswith(t + "_") and k != f"{t}_n")
        print(f"  {t} ({res.get(t + '_n')} examples): " + ", ".join(f"{k[len(t) + 1:]} {res[k]:.4f}" for k in keys))


if __name__ == "__main__":
    sys.exit(main())
