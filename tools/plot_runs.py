"""Plot and tabulate grid runs: validation loss vs epoch and vs tokens seen for every method,
offline-task accuracy vs epoch, a Markdown + CSV table (best / final validation loss, epoch of the best,
rise after the best, task accuracy, Muennighoff's R*; mean ± std over seeds), and every run's raw curves
(curves.csv, with runs.csv: what else the report reads of each run).

    python tools/plot_runs.py runs/tiny_grid                       # writes into runs/tiny_grid/report/
    python tools/plot_runs.py runs/g1 runs/g2 --output docs/results --prefix tiny_grid_
    python tools/plot_runs.py runs/quickstart/ar_s1234   # one run: also its train + validation loss_curve.png
    python tools/plot_runs.py docs/results/horizon_curves.csv runs/horizon_s3 --output docs/results --prefix horizon_

    python tools/plot_runs.py docs/results/horizon_curves.csv mdm_480ep=runs/horizon_long --methods ar,mdm,mdm_480ep \
        --output docs/results --prefix horizon_long_

A curves.csv written here (runs.csv beside it) stands for its runs when their directories are gone: the fourth
line adds the runs under runs/horizon_s3 to the published ones (a run directory replaces an archived run of the same
method and seed). A place written NAME=PATH reports its runs under the method NAME (the last line: mdm trained for
480 epochs in a grid of its own, beside the 120-epoch mdm runs); --methods keeps those methods only.

R* is fitted per method against the fresh-data reference runs (ar_fresh, mdm_fresh) of the grid;
see megatron_dataeff/evaluation/effective_data.py for exactly what is fitted.
"""

import argparse
import os
import sys

from megatron_dataeff.entry import tool_main
from megatron_dataeff.errors import DataError


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="grid directories, run directories, or a curves.csv written here; "
                   "NAME=PATH reports the runs at PATH (one method's) under the method NAME")
    p.add_argument("--methods", default=None, help="comma-separated: report these methods only (default: all)")
    p.add_argument("--output", default=None, help="where to write (default: DIR/report of the first DIR)")
    p.add_argument("--prefix", default="", help="file name prefix, e.g. tiny_grid_")
    args = p.parse_args(argv)
    from megatron_dataeff.experiments.report import (find_runs, markdown_table, place_path, plot_loss_curve, plot_runs,
                                                    summarise, write_csv, write_curves_csv)

    runs = find_runs(args.dirs)
    if not runs:
        raise DataError(f"no runs with validation records under {' '.join(args.dirs)}")
    if args.methods:
        keep = [m for m in args.methods.split(",") if m]
        missing = sorted(set(keep) - {r.method for r in runs})
        if missing:
            raise DataError(f"--methods {args.methods}: no runs of {', '.join(missing)} under "
                            f"{' '.join(args.dirs)} (there: {', '.join(sorted({r.method for r in runs}))})")
        runs = [r for r in runs if r.method in keep]
    first = place_path(args.dirs[0])[1]
    first = os.path.dirname(first) if os.path.isfile(first) else first
    out = args.output or os.path.join(first, "report")
    os.makedirs(out, exist_ok=True)
    rows = summarise(runs)
    table = markdown_table(rows)
    md = os.path.join(out, args.prefix + "summary.md")
    with open(md, "w") as f:
        f.write(table)
    write_csv(rows, os.path.join(out, args.prefix + "summary.csv"))
    write_curves_csv(runs, os.path.join(out, args.prefix + "curves.csv"))
    pngs = plot_runs(runs, out, args.prefix)
    single = [d for d in args.dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    for d in single:  # a run directory given directly: its own train + validation loss curve too
        name = "loss_curve.png" if len(single) == 1 else os.path.basename(os.path.normpath(d)) + "_loss_curve.png"
        pngs.append(plot_loss_curve(d, os.path.join(out, args.prefix + name)))
    print(table)
    print("wrote " + ", ".join([md, os.path.join(out, args.prefix + "summary.csv"),
                                os.path.join(out, args.prefix + "curves.csv"), *pngs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
