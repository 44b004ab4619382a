"""Statistics of a grid over seeds: mean and standard error, a paired test against plain AR, and the
effective-data multiple of each method.

* mean +- standard error (sample standard deviation / sqrt(seeds)) of each per-run figure;
* the paired t-test of a method's best validation loss against plain AR's at the same seeds (the seed
  fixes the initial weights and the data order, so pairing removes their share of the variance); a
  two-sided p-value, None below two pairs;
* effective data: plain AR runs at several unique-token budgets (`ar_u{F}` in the grid: F x the budget,
  the same number of steps) give the law best_loss(U) = E + A U^-alpha (fitted to the per-budget means);
  a method's best loss read through the inverse law is the number of unique tokens plain AR would need to
  match it, reported as a multiple of the grid's budget, with a 68% interval from resampling the seeds of
  every run (bootstrap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_dataeff.evaluation.effective_data import fit_power_law


def mean_se(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """(mean, standard error of the mean); the error is None for fewer than two values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def paired_test(method: dict[int, float], baseline: dict[int, float]) -> tuple[Optional[float], Optional[float], int]:
    """(mean of method - baseline over the shared seeds, two-sided paired t-test p-value, pairs)."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None, None, 0
    d = np.array([method[s] - baseline[s] for s in seeds])
    if len(d) < 2:
        return float(d.mean()), None, len(d)
    if float(d.std(ddof=1)) == 0.0:
        return float(d.mean()), (1.0 if d.mean() == 0 else 0.0), len(d)
    from scipy import stats

    return float(d.mean()), float(stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue), \
        len(d)


@dataclass
class EffectiveData:
    """How many unique tokens plain AR would need for a method's best loss, as a multiple of the budget."""

    multiple: Optional[float]  # None when the law cannot say (see `note`)
    low: Optional[float] = None  # 16th percentile over bootstrap resamples
    high: Optional[float] = None  # 84th percentile
    note: str = "ok"


def _law(budgets: dict[float, list[float]]):
    """The power law through the per-budget mean best losses (needs 3 budgets)."""
    if len(budgets) < 3:
        return None
    xs = sorted(budgets)
    return fit_power_law(xs, [float(np.mean(budgets[x])) for x in xs], min_points=3)


def _multiple(law, loss: float) -> float:
    return law.data_for_loss(loss) if law is not None else math.nan


def effective_data(budgets: dict[float, list[float]], method_losses: list[float], *, resamples: int = 400,
                   seed: int = 0) -> EffectiveData:
    """`budgets`: {budget multiple F: best losses of plain AR at F x the unique tokens (one per seed)};
    `method_losses`: a method's best losses (one per seed).  The multiple of the budget plain AR would need."""
    if len(budgets) < 3:
        return EffectiveData(None, note=f"needs plain AR at >= 3 budgets (ar_u*), has {len(budgets)}")
    if not method_losses:
        return EffectiveData(None, note="no runs")
    law = _law(budgets)
    if law is None:
        return EffectiveData(None, note="no power law fits the budget runs (loss not falling with data)")
    point = _multiple(law, float(np.mean(method_losses)))
    if not math.isfinite(point):
        return EffectiveData(None, note="below the law's floor (more than any amount of plain-AR data gives)")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        boot = {x: list(rng.choice(v, size=len(v))) for x, v in budgets.items()}
        m = float(np.mean(rng.choice(method_losses, size=len(method_losses))))
        draws.append(_multiple(_law(boot), m))
    finite = np.array([d for d in draws if math.isfinite(d)])
    if len(finite) < resamples // 2:
        return EffectiveData(point, note="unstable under resampling of the seeds")
    return EffectiveData(point, float(np.percentile(finite, 16)), float(np.percentile(finite, 84)))
