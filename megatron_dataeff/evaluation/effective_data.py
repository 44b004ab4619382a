"""Muennighoff et al.'s effective-data model, fitted per method from a data-constrained sweep.

Muennighoff et al. (2023) model repeated data as worth less and less: after U unique tokens seen
for R repetitions beyond the first pass (R = epochs - 1), the effective data is

    D'(R) = U + U · R* · (1 - exp(-R / R*)),

R* being the "half-life" of repeated tokens (large R* = repeats almost as good as fresh data).

What we fit, per method:
1. The loss-vs-data law on fresh data, L(D) = E + A · D^-α, fitted to the validation curve of a
   fresh-data reference run (`ar_fresh` / `mdm_fresh` in the grid: same model, same number of
   steps and schedule, but unique_tokens x epochs fresh tokens seen once), by least squares of
   log(L - E) on log D over a grid of E.
2. Each validation point of the method's run at epoch e >= 1, up to the epoch of its best loss
   (the model has no term for overfitting, so the rise after the best is left out), is mapped
   through the inverse law to the fresh-data amount that gives the same loss: D'_obs = (A / (L - E))^(1/α).
3. R* minimises Σ (log D'_obs - log D'(R; R*))² over R* in [0.1, 1e4] (log grid, then refined).

R* is reported as not identifiable (None) when fewer than 3 usable points exist, a loss lies
below the fitted floor E, or the optimum sits at the edge of the range (repeats worth nothing or
as good as fresh data within the observed epochs).  The comparison of losses at different steps
under the same cosine schedule makes this an approximation, not Muennighoff's multi-run fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

R_MIN, R_MAX = 0.1, 1e4


@dataclass
class PowerLaw:
    """L(D) = E + A · D^-alpha."""

    E: float
    A: float
    alpha: float

    def loss(self, d):
        return self.E + self.A * np.asarray(d, dtype=float) ** (-self.alpha)

    def data_for_loss(self, loss: float) -> float:
        """The fresh-data amount with this loss (inf at or below the floor E)."""
        if loss <= self.E:
            return math.inf
        return (self.A / (loss - self.E)) ** (1.0 / self.alpha)


def fit_power_law(tokens: Sequence[float], losses: Sequence[float], min_points: int = 4) -> Optional[PowerLaw]:
    """Least-squares fit of log(L - E) = log A - alpha log D over a grid of floors E (None with fewer than
    `min_points` points or no falling law)."""
    d = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    keep = (d > 0) & np.isfinite(y)
    d, y = d[keep], y[keep]
    if len(d) < min_points:
        return None
    # every floor E of the grid at once: the least-squares line of log(L - E) on -log D, in closed form
    floors = np.linspace(0.0, 0.999 * y.min(), 400)[:, None]
    t, z = -np.log(d)[None, :], np.log(y[None, :] - floors)
    tm, zm = t.mean(axis=1, keepdims=True), z.mean(axis=1, keepdims=True)
    var = ((t - tm) ** 2).sum(axis=1)
    if float(var[0]) == 0.0:
        return None
    alpha = ((t - tm) * (z - zm)).sum(axis=1) / var
    log_a = zm[:, 0] - alpha * tm[:, 0]
    pred = floors + np.exp(log_a)[:, None] * d[None, :] ** (-alpha[:, None])
    sse = ((pred - y[None, :]) ** 2).sum(axis=1)
    sse = np.where(alpha > 0, sse, np.inf)
    i = int(np.argmin(sse))
    if not np.isfinite(sse[i]):
        return None
    return PowerLaw(float(floors[i, 0]), float(np.exp(log_a[i])), float(alpha[i]))


def effective_data(R, unique_tokens: float, r_star: float):
    """Muennighoff's D' for R repetitions beyond the first epoch."""
    R = np.asarray(R, dtype=float)
    return unique_tokens * (1.0 + r_star * (1.0 - np.exp(-R / r_star)))


@dataclass
class HalfLifeFit:
    r_star: Optional[float]  # None when not identifiable
    reason: str  # why not, or "ok"
    points: int
    law: Optional[PowerLaw] = None


def fit_half_life(epochs: Sequence[float], losses: Sequence[float], unique_tokens: float,
                  reference_tokens: Sequence[float], reference_losses: Sequence[float]) -> HalfLifeFit:
    """R* of one run's validation curve, calibrated by a fresh-data reference curve."""
    law = fit_power_law(reference_tokens, reference_losses)
    if law is None:
        return HalfLifeFit(None, "no usable fresh-data reference curve", 0)
    e = np.asarray(epochs, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(e) == 0:
        return HalfLifeFit(None, "no validation points", 0, law)
    best = int(np.argmin(y))
    sel = (e >= 1.0) & (np.arange(len(e)) <= best)
    if sel.sum() < 3:
        return HalfLifeFit(None, "fewer than 3 points between epoch 1 and the best loss", int(sel.sum()), law)
    d_obs = np.array([law.data_for_loss(v) for v in y[sel]])
    if not np.all(np.isfinite(d_obs)):
        return HalfLifeFit(None, "losses below the reference law's floor", int(sel.sum()), law)
    R = e[sel] - 1.0
    target = np.log(d_obs)

    def sse(r):
        return float(((np.log(effective_data(R, unique_tokens, r)) - target) ** 2).sum())

    grid = np.exp(np.linspace(math.log(R_MIN), math.log(R_MAX), 400))
    values = np.array([sse(r) for r in grid])
    i = int(values.argmin())
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    for _ in range(60):  # golden-section refinement in log space
        a, b = math.log(lo), math.log(hi)
        m1, m2 = b - 0.618 * (b - a), a + 0.618 * (b - a)
        if sse(math.exp(m1)) < sse(math.exp(m2)):
            hi = math.exp(m2)
        else:
            lo = math.exp(m1)
    r = math.sqrt(lo * hi)
    if i == 0 or i == len(grid) - 1:
        return HalfLifeFit(None, f"optimum at the edge of [{R_MIN:g}, {R_MAX:g}]", int(sel.sum()), law)
    if r > 20 * max(R.max(), 1.0):
        return HalfLifeFit(None, "R* far beyond the observed repetitions (repeats look as good as fresh data)",
                           int(sel.sum()), law)
    return HalfLifeFit(r, "ok", int(sel.sum()), law)
