"""Read grid runs (metrics.jsonl, run.json, downstream.jsonl) and summarise them: tables and plots.

Per run: best and final validation loss, the epoch of the best, the rise after the best (final -
best: how much the run overfits), offline-task accuracy of the last scored checkpoint, and
Muennighoff's R* (see effective_data.py).  Per method: mean ± std over seeds.
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
from megatron_dataeff.evaluation.effective_data import fit_half_life

TASK_METRICS = ("cloze_acc", "continuation_acc", "continuation_acc_norm")


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
    return Run(path=path, method=method, seed=seed, unique_tokens=int(info.get("unique_tokens", 0)),
               valid=curve("valid"), train=curve("train"), downstream=downstream,
               objective=RunConfig.from_dict(info.get("config", {})).objective.name)


def find_runs(dirs) -> list[Run]:
    """Every run under the given directories (a run directory or a grid directory of runs)."""
    runs = []
    for d in dirs:
        if os.path.exists(os.path.join(d, "metrics.jsonl")):
            cands = [d]
        else:
            cands = sorted(os.path.join(d, x) for x in os.listdir(d)
                           if os.path.exists(os.path.join(d, x, "metrics.jsonl")))
        for c in cands:
            r = load_run(c)
            if r is not None and r.valid:
                runs.append(r)
    return runs


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


def summarise(runs: list[Run]) -> list[dict]:
    """One row per method: mean and std over seeds of each per-run figure."""
    from megatron_dataeff.experiments.grid import METHODS, reference_of

    refs = {(r.method, r.seed): r for r in runs if r.method.endswith("_fresh")}
    per_run = []
    for r in runs:
        ref_name = reference_of(r.method) if r.method in METHODS else ("mdm_fresh" if r.objective == "mdm"
                                                                      else "ar_fresh")
        ref = refs.get((ref_name, r.seed)) or next((v for (m, _), v in refs.items() if m == ref_name), None)
        per_run.append(summarise_run(r, ref))
    order = list(METHODS)
    methods = sorted({p["method"] for p in per_run}, key=lambda m: (order.index(m) if m in order else 99, m))
    rows = []
    keys = ["best_val_loss", "best_epoch", "final_val_loss", "rise_after_best", *TASK_METRICS, "r_star"]
    for m in methods:
        group = [p for p in per_run if p["method"] == m]
        row = {"method": m, "seeds": len(group)}
        for k in keys:
            vals = [p[k] for p in group if p.get(k) is not None]
            row[k] = float(np.mean(vals)) if vals else None
            row[k + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        notes = {p.get("r_star_note") for p in group if p.get("r_star") is None}
        row["r_star_note"] = "; ".join(sorted(n for n in notes if n)) if notes else ""
        rows.append(row)
    return rows


def _fmt(row, k, digits=3) -> str:
    v, s = row.get(k), row.get(k + "_std")
    if v is None:
        return "n/a"
    return f"{v:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{v:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    head = ["method", "seeds", "best val loss", "best epoch", "final val loss", "rise after best",
            "cloze acc", "continuation acc", "continuation acc_norm", "R*"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rstar = _fmt(r, "r_star", 1)
        if rstar == "n/a" and r.get("r_star_note"):
            rstar = f"n/a ({r['r_star_note']})"
        lines.append("| " + " | ".join([r["method"], str(r["seeds"]), _fmt(r, "best_val_loss"), _fmt(r, "best_epoch", 1),
                                        _fmt(r, "final_val_loss"), _fmt(r, "rise_after_best"), _fmt(r, "cloze_acc"),
                                        _fmt(r, "continuation_acc"), _fmt(r, "continuation_acc_norm"), rstar]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str) -> None:
    keys = list(rows[0].keys()) if rows else ["method"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def _style(method: str):
    families = [("ar_td", "tab:blue"), ("ar_attn", "tab:orange"), ("ar_mlp", "tab:green"), ("ar_wd", "tab:purple"),
                ("mdm_fresh", "tab:red"), ("ar_fresh", "black"), ("mdm", "tab:red"), ("ar", "black")]
    for prefix, color in families:
        if method.startswith(prefix):
            m = re.search(r"(\d+\.\d+)$", method)
            alpha = 0.35 + 0.65 * min(1.0, float(m.group(1))) if m else 1.0
            return {"color": color, "alpha": alpha, "linestyle": "--" if method.endswith("_fresh") else "-"}
    return {"color": "gray", "alpha": 1.0, "linestyle": "-"}


def plot_runs(runs: list[Run], out_dir: str, prefix: str = "") -> list[str]:
    """PNGs: validation loss vs epoch, vs tokens seen, and offline-task accuracy vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for xkey, xlabel, fname in ((0, "epoch", "val_loss.png"), (1, "tokens seen", "val_loss_vs_tokens.png")):
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=False)
        for r in runs:
            ax = axes[1] if r.objective == "mdm" else axes[0]
            x = [v[xkey] for v in r.valid]
            ax.plot(x, [v[2] for v in r.valid], label=f"{r.method} s{r.seed}", lw=1.4, **_style(r.method))
        for ax, title in zip(axes, ("AR variants: validation NLL", "masked diffusion: validation ELBO")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("nats / token")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2)
                lo = min(min(line.get_ydata()) for line in ax.lines)
                hi = max(np.percentile(line.get_ydata(), 60) for line in ax.lines)
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
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
    return written


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
