"""Read grid runs (metrics.jsonl, run.json, downstream.jsonl) and summarise them: tables and plots.

Per run: best and final validation loss, the epoch of the best, the rise after the best (final -
best: how much the run overfits), offline-task accuracy of the last scored checkpoint, and
Muennighoff's R* (see effective_data.py).  Per method: mean ± standard error over seeds, a paired test
against plain AR and the effective-data multiple (statistics.py); plots draw each method's mean curve with
a ± standard-error band when it has several seeds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_dataeff.config import RunConfig
from megatron_dataeff.errors import DataError
from megatron_dataeff.evaluation.effective_data import fit_half_life
from megatron_dataeff.experiments.grid import BUDGETS, METHODS, reference_of
from megatron_dataeff.experiments.statistics import effective_data, mean_se, paired_test

TASK_METRICS = ("cloze_acc", "continuation_acc", "continuation_acc_norm")
DIFFUSION_OBJECTIVES = ("mdm", "block")  # validated by an ELBO: the plots' right panel


@dataclass
class Run:
    path: str
    method: str
    seed: int
    unique_tokens: int
    valid: list = field(default_factory=list)  # [(epoch, tokens, loss)] sorted, one per iteration
    train: list = field(default_factory=list)  # [(epoch, tokens, loss)] of the train log records, likewise
    downstream: list = field(default_factory=list)  # [{epoch, cloze_acc, ...}]
    objective: str = "ar"
    flops_per_token: Optional[float] = None  # training FLOPs per token seen (run.json's compute record)
    block_size: Optional[int] = None  # block diffusion's --block-size
    clipped_schedule: bool = False  # trained on a clipped masking schedule (--mdm-t-min / --mdm-t-max)


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a killed run
    return out


def load_run(path: str) -> Optional[Run]:
    metrics = _read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not metrics:
        return None
    info = {}
    if os.path.exists(os.path.join(path, "run.json")):
        with open(os.path.join(path, "run.json")) as f:
            info = json.load(f)
    name = os.path.basename(os.path.normpath(path))
    m = re.fullmatch(r"(.+)_s(\d+)", name)
    method, seed = (m.group(1), int(m.group(2))) if m else (name, int(info.get("config", {}).get("optim", {})
                                                                      .get("seed", 0)))
    def curve(split):
        by_iter = {}
        for r in metrics:  # a resumed run repeats iterations after its last checkpoint: the last one wins
            if r.get("split") == split and r.get("loss") is not None and math.isfinite(r["loss"]):
                by_iter[r["iteration"]] = (r["epoch"], r.get("consumed_tokens", 0), r["loss"])
        return [by_iter[k] for k in sorted(by_iter)]

    downstream = sorted((d for d in _read_jsonl(os.path.join(path, "downstream.jsonl")) if "epoch" in d),
                        key=lambda d: d["epoch"])
    cfg = RunConfig.from_dict(info.get("config", {}))
    flops = (info.get("compute") or {}).get("flops_per_step")
    tokens_per_step = (cfg.optim.global_batch_size or 0) * cfg.model.seq_length
    return Run(path=path, method=method, seed=seed, unique_tokens=int(info.get("unique_tokens", 0)),
               valid=curve("valid"), train=curve("train"), downstream=downstream, objective=cfg.objective.name,
               flops_per_token=flops / tokens_per_step if flops and tokens_per_step else None,
               block_size=cfg.objective.block_size,
               clipped_schedule=(cfg.objective.t_min, cfg.objective.mdm_t_max) != (cfg.objective.mdm_eps, 1.0))


def place_path(place: str) -> tuple[str, str]:
    """(NAME, PATH) of a place find_runs takes written `NAME=PATH`; ("", place) of any other (a path that exists,
    `=` in its name or not, is a path)."""
    if "=" in place and not os.path.exists(place):
        name, _, path = place.partition("=")
        return name, path
    return "", place


def find_runs(dirs) -> list[Run]:
    """Every run under the given places: a run directory, a grid directory of runs, or a `curves.csv` that
    write_curves_csv wrote (with its `runs.csv` beside it: the archived runs of an earlier report, whose run
    directories may be gone).  A run directory replaces an archived run of the same method and seed (a re-run).
    A place written `NAME=PATH` reports its runs under the method NAME: runs of one method trained otherwise (say
    for more epochs, in a grid of their own) sit beside that method's runs instead of replacing or joining them."""
    runs, archived = [], []
    for d in dirs:
        name, path = place_path(d)
        if not os.path.exists(path):
            raise DataError(f"{d}: no such grid, run directory or curves.csv" + (f": {path}" if name else ""))
        if name:
            if not re.fullmatch(r"[\w.+-]+", name):
                raise DataError(f"{d}: {name!r} is not a method name (letters, digits, _ . + -)")
            found = find_runs([path])
            if len({r.method for r in found}) > 1:
                raise DataError(f"{d}: holds the runs of {len({r.method for r in found})} methods "
                                f"({', '.join(sorted({r.method for r in found}))}); NAME=PATH names one method's")
            for r in found:
                r.method = name
            (archived if os.path.isfile(path) else runs).extend(found)
            continue
        if os.path.isfile(d):
            if not d.endswith("curves.csv"):
                raise DataError(f"{d}: not a grid or run directory, nor a curves.csv written by tools/plot_runs.py")
            archived.extend(read_curves_csv(d))
            continue
        if os.path.exists(os.path.join(d, "metrics.jsonl")):
            cands = [d]
        else:
            cands = sorted(os.path.join(d, x) for x in os.listdir(d)
                           if os.path.exists(os.path.join(d, x, "metrics.jsonl")))
        for c in cands:
            r = load_run(c)
            if r is not None and r.valid:
                runs.append(r)
    have = {(r.method, r.seed) for r in runs}
    return [r for r in archived if (r.method, r.seed) not in have] + runs


def summarise_run(run: Run, reference: Optional[Run]) -> dict:
    e = np.array([v[0] for v in run.valid])
    y = np.array([v[2] for v in run.valid])
    i = int(y.argmin())
    out = {"method": run.method, "seed": run.seed, "best_val_loss": float(y[i]), "best_epoch": float(e[i]),
           "final_val_loss": float(y[-1]), "final_epoch": float(e[-1]), "rise_after_best": float(y[-1] - y[i])}
    if run.downstream:
        last = run.downstream[-1]
        for k in TASK_METRICS:
            if k in last:
                out[k] = float(last[k])
    if reference is None or run.method.endswith("_fresh"):
        out["r_star"], out["r_star_note"] = None, ("reference run" if run.method.endswith("_fresh")
                                                   else "no fresh-data reference run")
    else:
        fit = fit_half_life(e, y, run.unique_tokens, [v[1] for v in reference.valid],
                            [v[2] for v in reference.valid])
        out["r_star"], out["r_star_note"] = fit.r_star, fit.reason
    return out


def crossing(run: Run, level: float) -> Optional[tuple[float, float, Optional[float]]]:
    """(epoch, tokens seen, training FLOPs) of the first validation point of `run` at or below `level`, None if
    it never gets there."""
    for epoch, tokens, loss in run.valid:
        if loss <= level:
            return epoch, tokens, tokens * run.flops_per_token if run.flops_per_token else None
    return None


def summarise(runs: list[Run]) -> list[dict]:
    """One row per method: mean and standard error over seeds of each per-run figure, the paired test of its
    best validation loss against plain AR's (same seeds), where each seed first gets below plain AR's best
    of the same seed (epoch and training FLOPs), and its effective-data multiple (plain AR at several
    budgets, experiments/statistics.py).  A diffusion model's validation loss is its ELBO, an upper bound on
    its NLL: compared with AR's NLL it is the comparison that favours AR."""
    refs = {(r.method, r.seed): r for r in runs if r.method.endswith("_fresh")}
    per_run = []
    ar_best = {r.seed: min(v[2] for v in r.valid) for r in runs if r.method == "ar"}
    for r in runs:
        ref_name = reference_of(r.method) if r.method in METHODS else ("mdm_fresh" if r.objective == "mdm"
                                                                      else "ar_fresh")
        ref = refs.get((ref_name, r.seed)) or next((v for (m, _), v in refs.items() if m == ref_name), None)
        row = summarise_run(r, ref)
        level = ar_best.get(r.seed, float(np.mean(list(ar_best.values()))) if ar_best else None)
        if level is not None and r.method != "ar" and not r.method.endswith("_fresh") and r.method not in BUDGETS:
            hit = crossing(r, level)
            row["crosses_ar_best"] = hit is not None
            if hit is not None:
                row["cross_epoch"], row["cross_flops"] = hit[0], hit[2]
        per_run.append(row)
    order = list(METHODS)
    methods = sorted({p["method"] for p in per_run}, key=lambda m: (order.index(m) if m in order else 99, m))
    best = {m: {p["seed"]: p["best_val_loss"] for p in per_run if p["method"] == m} for m in methods}
    budgets = {BUDGETS[m]: list(best[m].values()) for m in methods if m in BUDGETS}
    rows = []
    keys = ["best_val_loss", "best_epoch", "final_val_loss", "rise_after_best", *TASK_METRICS, "r_star",
            "cross_epoch", "cross_flops"]
    for m in methods:
        group = [p for p in per_run if p["method"] == m]
        row = {"method": m, "seeds": len(group)}
        for k in keys:
            row[k], row[k + "_se"] = mean_se([p[k] for p in group if p.get(k) is not None])
        crossed = [p["crosses_ar_best"] for p in group if "crosses_ar_best" in p]
        row["crossed"], row["cross_tried"] = sum(crossed), len(crossed)
        notes = {p.get("r_star_note") for p in group if p.get("r_star") is None}
        row["r_star_note"] = "; ".join(sorted(n for n in notes if n)) if notes else ""
        comparable = m != "ar" and "ar" in best  # an ELBO against an NLL: the comparison favours AR
        row["delta_vs_ar"], row["p_vs_ar"], row["pairs_vs_ar"] = (paired_test(best[m], best["ar"]) if comparable
                                                                  else (None, None, 0))
        if not m.startswith("mdm"):
            eff = effective_data(budgets, list(best[m].values()))
            row["effective_data"], row["effective_data_low"], row["effective_data_high"] = eff.multiple, eff.low, eff.high
            row["effective_data_note"] = eff.note
        rows.append(row)
    return rows


def _fmt(row, k, digits=3) -> str:
    v, s = row.get(k), row.get(k + "_se")
    if v is None:
        return "n/a"
    return f"{v:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{v:.{digits}f}"


def _fmt_delta(row) -> str:
    if row.get("delta_vs_ar") is None:
        return ""
    p = row.get("p_vs_ar")
    return f"{row['delta_vs_ar']:+.3f}" + (f" (p={p:.2g})" if p is not None else "")


def _fmt_effective(row) -> str:
    if row.get("effective_data") is None:
        return "" if "effective_data_note" not in row else f"n/a ({row['effective_data_note']})"
    lo, hi = row.get("effective_data_low"), row.get("effective_data_high")
    return f"x{row['effective_data']:.2f}" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else "")


def _fmt_cross(row) -> str:
    if not row.get("cross_tried"):
        return ""
    n, k = row["cross_tried"], row["crossed"]
    if k == 0:
        return f"no ({n}/{n} seeds stay above)"
    flops = f", {row['cross_flops']:.2g} FLOPs" if row.get("cross_flops") is not None else ""
    seeds = "" if k == n else f" ({k}/{n} seeds)"
    return f"epoch {_fmt(row, 'cross_epoch', 1)}{flops}{seeds}"


def markdown_table(rows: list[dict]) -> str:
    """Mean ± standard error over seeds; Δ vs ar: the best validation loss minus plain AR's at the same seeds,
    with the paired t-test's p-value; effective data: the unique tokens plain AR would need for the method's
    best loss, as a multiple of the grid's budget (68% interval over resampled seeds); below AR's best: the
    first epoch (and training FLOPs) at which the method's validation loss is at or below plain AR's best of the
    same seed, "no" if it never is.  A column with no value
    in any row (no offline tasks scored, no fresh-data reference, fewer than 3 AR budgets) is left out."""
    head = ["method", "seeds", "best val loss", "Δ vs ar (paired p)", "effective data", "best epoch",
            "final val loss", "rise after best", "below AR's best at", "cloze acc", "continuation acc",
            "continuation acc_norm", "R*"]
    cells = []
    for r in rows:
        rstar = _fmt(r, "r_star", 1)
        if rstar == "n/a" and r.get("r_star_note"):
            rstar = f"n/a ({r['r_star_note']})"
        cells.append([r["method"], str(r["seeds"]), _fmt(r, "best_val_loss"), _fmt_delta(r), _fmt_effective(r),
                      _fmt(r, "best_epoch", 1), _fmt(r, "final_val_loss"), _fmt(r, "rise_after_best"),
                      _fmt_cross(r), _fmt(r, "cloze_acc"), _fmt(r, "continuation_acc"), _fmt(r, "continuation_acc_norm"), rstar])
    keep = [j for j in range(len(head))
            if not cells or any(row[j] and not row[j].startswith("n/a") for row in cells)]
    lines = ["| " + " | ".join(head[j] for j in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(row[j] for j in keep) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def best_run(runs: list[Run]) -> Run:
    """The run with the lowest validation loss at any point (a diffusion run's ELBO, an upper bound on its NLL,
    competes as it is)."""
    if not runs:
        raise ValueError("no runs to choose from")
    return min(runs, key=lambda r: min(v[2] for v in r.valid))


def write_csv(rows: list[dict], path: str) -> None:
    keys = list(rows[0].keys()) if rows else ["method"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


RUN_FIELDS = ("method", "seed", "objective", "unique_tokens", "flops_per_token", "block_size", "clipped_schedule",
              "downstream")  # what a report needs of a run beyond its curves: runs.csv's columns


def runs_csv_path(curves_path: str) -> str:
    """`X/PREFIXruns.csv`, the per-run record written beside `X/PREFIXcurves.csv`."""
    return curves_path[:-len("curves.csv")] + "runs.csv"


def write_curves_csv(runs: list[Run], path: str) -> None:
    """The raw per-run curves behind the table and plots: one row per run, split and logged iteration; and beside
    them (runs_csv_path) one row per run with what else the report reads (objective, budget, FLOPs per token,
    offline-task scores), so that find_runs can read the report's runs back when their directories are gone."""
    runs = sorted(runs, key=lambda r: (r.method, r.seed))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "split", "epoch", "tokens", "loss"])
        for run in runs:
            for split, curve in (("valid", run.valid), ("train", run.train)):
                for epoch, tokens, loss in curve:
                    w.writerow([run.method, run.seed, split, repr(float(epoch)), tokens, repr(float(loss))])
    with open(runs_csv_path(path), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_FIELDS)
        for run in runs:
            w.writerow([run.method, run.seed, run.objective, run.unique_tokens,
                        "" if run.flops_per_token is None else repr(run.flops_per_token),
                        "" if run.block_size is None else run.block_size, int(run.clipped_schedule),
                        json.dumps(run.downstream, sort_keys=True)])


def read_curves_csv(path: str) -> list[Run]:
    """The runs of a report's curves.csv and runs.csv (write_curves_csv), as Run records; a file that is not one
    is refused naming the file and line."""
    meta_path = runs_csv_path(path)
    if not os.path.exists(meta_path):
        raise DataError(f"{path}: no {os.path.basename(meta_path)} beside it (written with the curves by "
                        f"tools/plot_runs.py): the runs' objectives and budgets are not known")
    runs: dict[tuple[str, int], Run] = {}
    with open(meta_path, newline="") as f:
        rows = csv.reader(f)
        if tuple(next(rows, ())) != RUN_FIELDS:
            raise DataError(f"{meta_path}:1: expected the columns {','.join(RUN_FIELDS)}")
        for line, row in enumerate(rows, start=2):
            try:
                method, seed, objective, unique, flops, block, clipped, downstream = row
                runs[(method, int(seed))] = Run(
                    path=f"{path}#{method}_s{seed}", method=method, seed=int(seed), unique_tokens=int(unique),
                    objective=objective, flops_per_token=float(flops) if flops else None,
                    block_size=int(block) if block else None, clipped_schedule=bool(int(clipped)),
                    downstream=json.loads(downstream))
            except ValueError as e:
                raise DataError(f"{meta_path}:{line}: not a run record ({e})") from None
    with open(path, newline="") as f:
        rows = csv.reader(f)
        if next(rows, None) != ["method", "seed", "split", "epoch", "tokens", "loss"]:
            raise DataError(f"{path}:1: expected the columns method,seed,split,epoch,tokens,loss")
        for line, row in enumerate(rows, start=2):
            try:
                method, seed, split, epoch, tokens, loss = row
                run = runs[(method, int(seed))]
                point = (float(epoch), int(tokens), float(loss))
            except KeyError:
                raise DataError(f"{path}:{line}: run {row[0]}_s{row[1]} is not in {meta_path}") from None
            except ValueError as e:
                raise DataError(f"{path}:{line}: not a curve point ({e})") from None
            if split not in ("valid", "train"):
                raise DataError(f"{path}:{line}: split {split!r} is neither valid nor train")
            getattr(run, split).append(point)
    return [r for r in runs.values() if r.valid]


def _style(method: str):
    """One colour per kind of method (a family's strength as its opacity); plain AR at other data budgets
    dotted grey, fresh-data references dashed, packed-document variants (`_doc`) dash-dotted, a method trained
    for another number of epochs (`_480ep`, named so with tools/plot_runs.py's NAME=PATH) dash-dot-dotted."""
    if method.endswith("_doc"):
        return {**_style(method[:-len("_doc")]), "linestyle": "-."}
    longer = re.fullmatch(r"(.+)_\d+ep", method)
    if longer:
        return {**_style(longer.group(1)), "linestyle": (0, (4, 1.5, 1, 1.5, 1, 1.5))}
    families = [("ar_u", "dimgray"), ("ar_td0.3_random", "tab:cyan"), ("ar_td0.3_mixed", "tab:olive"),
                ("ar_td0.3_span", "tab:pink"), ("ar_td0.5_anneal", "tab:brown"), ("ar_mir", "goldenrod"),
                ("dual", "tab:gray"), ("ar_td", "tab:blue"), ("ar_attn", "tab:orange"), ("ar_mlp", "tab:green"),
                ("ar_wd", "tab:purple"), ("mdm_fresh", "tab:red"), ("ar_fresh", "black"), ("mdm", "tab:red"),
                ("ar", "black")]
    for prefix, color in families:
        if method.startswith(prefix):
            m = re.search(r"(\d+(?:\.\d+)?)$", method)
            strength = float(m.group(1)) / (4.0 if prefix == "ar_u" else 1.0) if m else 1.0
            alpha = 0.35 + 0.65 * min(1.0, strength)
            style = ":" if prefix == "ar_u" else "--" if method.endswith("_fresh") else "-"
            return {"color": color, "alpha": alpha, "linestyle": style}
    return {"color": "gray", "alpha": 1.0, "linestyle": "-"}


def _by_method(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.method, []).append(r)
    return out


def _mean_curve(group: list[Run], xkey: int):
    """(x, mean validation loss, standard error or None) of the seeds of one method, point by point over the
    validation points they all have (the same schedule puts them at the same epochs)."""
    n = min(len(r.valid) for r in group)
    x = np.array([v[xkey] for v in group[0].valid[:n]], dtype=float)
    y = np.array([[v[2] for v in r.valid[:n]] for r in group], dtype=float)
    se = y.std(axis=0, ddof=1) / math.sqrt(len(group)) if len(group) > 1 else None
    return x, y.mean(axis=0), se


def plot_runs(runs: list[Run], out_dir: str, prefix: str = "") -> list[str]:
    """PNGs: validation loss vs epoch and vs tokens seen (a method's mean over seeds with a ± standard-error
    band), and offline-task accuracy vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for xkey, xlabel, fname in ((0, "epoch", "val_loss.png"), (1, "tokens seen", "val_loss_vs_tokens.png")):
        fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), sharex=False)
        groups = _by_method(runs)
        ar_best = float(_mean_curve(groups["ar"], xkey)[1].min()) if "ar" in groups else None
        for method, group in groups.items():
            ax = axes[1] if group[0].objective in DIFFUSION_OBJECTIVES else axes[0]
            x, mean, se = _mean_curve(group, xkey)
            label = method if len(group) == 1 else f"{method} ({len(group)} seeds)"
            line, = ax.plot(x, mean, label=label, lw=1.4, **_style(method))
            if se is not None:
                ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
            below = np.nonzero(mean <= ar_best)[0] if ar_best is not None and method != "ar" \
                and not method.endswith("_fresh") and method not in BUDGETS else []
            if len(below):  # the mean curve's first point at or below plain AR's best: the crossover
                ax.plot([x[below[0]]], [mean[below[0]]], marker="o", ms=6, mfc="none", color=line.get_color())
        guides = []  # reference lines, not curves
        if ar_best is not None:
            for ax in axes:
                guides.append(ax.axhline(ar_best, color="black", lw=0.8, ls=(0, (1, 3)), zorder=0,
                                         label="plain AR's best (mean): circles mark where a curve gets there"))
        # On the epoch axis, plain AR at a smaller budget runs more epochs: the axis ends where the methods do.
        same_budget = [r for r in runs if not re.fullmatch(r"ar_u[\d.]+", r.method)]
        for ax, title in zip(axes, ("AR variants: validation NLL", "masked / block diffusion: validation ELBO")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("nats / token")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            curves = [line for line in ax.lines if line not in guides and len(line.get_ydata()) > 1]
            if curves:
                ax.legend(fontsize=7, ncol=3 if len(ax.lines) > 8 else 1, loc="upper center",
                          bbox_to_anchor=(0.5, -0.13))
                # the top leaves out the first steps' losses but never a curve's end (how far it rose)
                lo = min(min(line.get_ydata()) for line in curves)
                hi = max(max(np.percentile(line.get_ydata(), 60), line.get_ydata()[-1]) for line in curves)
                if ar_best is not None:
                    lo = min(lo, ar_best)
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
                if xkey == 0 and same_budget and len(same_budget) < len(runs):
                    ax.set_xlim(0, 1.02 * max(r.valid[-1][0] for r in same_budget))
        fig.tight_layout()
        path = os.path.join(out_dir, prefix + fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    with_ds = [r for r in runs if r.downstream]
    if with_ds:
        metrics = [k for k in TASK_METRICS if any(k in d for r in with_ds for d in r.downstream)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.5), squeeze=False)
        for ax, k in zip(axes[0], metrics):
            for r in with_ds:
                pts = [(d["epoch"], d[k]) for d in r.downstream if k in d]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{r.method} s{r.seed}",
                        lw=1.2, **_style(r.method))
            ax.set_xlabel("epoch")
            ax.set_title(k)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, prefix + "downstream.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    blocks = block_sizes(runs)
    if blocks:
        written.append(_plot_block_sizes(runs, blocks, os.path.join(out_dir, prefix + "block_size.png"), plt))
    return written


def block_sizes(runs: list[Run]) -> dict[int, list[Run]]:
    """{block size: its block-diffusion runs}, read from each run's config (those on the whole masking schedule:
    a clipped one is another method)."""
    out: dict[int, list[Run]] = {}
    for r in runs:
        if r.objective == "block" and r.block_size and not r.clipped_schedule:
            out.setdefault(r.block_size, []).append(r)
    return dict(sorted(out.items()))


def _plot_block_sizes(runs: list[Run], blocks: dict[int, list[Run]], path: str, plt) -> str:
    """Best validation loss (mean ± SE over seeds) against block size, beside plain AR's best NLL and masked
    diffusion's best ELBO."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = list(blocks)
    stats = [mean_se([min(v[2] for v in r.valid) for r in blocks[b]]) for b in sizes]
    ax.errorbar(sizes, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], marker="o", capsize=3,
                color="tab:red", label="block diffusion (ELBO)")
    for method, color, name in (("ar", "black", "plain AR (NLL)"), ("mdm", "tab:red", "masked diffusion (ELBO)"),
                                ("ar_td1.0", "tab:blue", "AR + masked input r ~ U(0,1) (NLL)")):
        group = [r for r in runs if r.method == method]
        if group:
            best, _ = mean_se([min(v[2] for v in r.valid) for r in group])
            ax.axhline(best, color=color, ls="--", lw=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("best validation loss (nats / token)")
    ax.set_title("between AR and masked diffusion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curve(run_dir: str, path: str) -> str:
    """One run's PNG: training loss and validation loss (AR: NLL; mdm: ELBO) against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(run_dir)
    if run is None or not (run.train or run.valid):
        raise ValueError(f"{run_dir}/metrics.jsonl: no train or validation losses to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for points, label, style in ((run.train, "train loss", dict(lw=1.0, alpha=0.7)),
                                 (run.valid, "validation " + ("ELBO" if run.objective == "mdm" else "NLL"),
                                  dict(lw=1.8, marker="o", ms=3))):
        if points:
            ax.plot([p[0] for p in points], [p[2] for p in points], label=label, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats / token")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
