"""The validation loss of a model under an objective: the one definition the trainer's validator and the
evaluation of a checkpoint share, so that what is evaluated is what was trained.

* Views: the objective's `evaluation_views`, each evaluated with `objective.view(name)` (AR: the next-token NLL on
  clean input; masked diffusion: the ELBO; dual: `ar`, its NLL, then `mdm`, its ELBO).  The first view's loss is
  the validation loss.
* Windows: windows 0..n-1 of the validation stream (`valid_batch(start, size)`: the split's windows in order), in
  batches of consecutive windows.  The trainer validates `--eval-iters` global batches (`Validation.of_training`),
  evaluation the first n windows of the split (default: all of them).
* Noise: fixed, drawn from the objective's evaluation stream keyed by the window's index, so every validation of a
  run sees the same corruption.  A view whose loss is a Monte-Carlo estimate (`monte_carlo`) may take several
  copies of each window, their mask rates stratified (`prepare_evaluation`); one copy is exactly what the trainer
  sees (`prepare(..., evaluation=True)`, through its forward step).
* Reduction: a batch of windows reports either its (loss sum, tokens) (the trainer: a global batch through
  megatron-core's pipelined schedule, summed over the ranks) or each window's per-token loss (evaluation in one
  process).  A view's loss is sum / tokens over all batches, or the mean of the windows' values, the same number
  when the windows count the same tokens; the windows' values also give its standard error (their standard
  deviation over sqrt(windows)), which covers the choice of validation text and, for diffusion, the Monte-Carlo
  noise.

Clients: `training/validator.py` (every rank, megatron-core's schedule) and `validation_loss` here (a
`ModelScorer` in this process, for `tools/evaluate.py`; `--mc-samples 1` reproduces the trainer's validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from megatron_dataeff.errors import ConfigError, DataError
from megatron_dataeff.evaluation.scoring import ModelScorer
from megatron_dataeff.objectives import Objective


@dataclass(frozen=True)
class View:
    """One loss a validation reports."""

    name: str  # the objective's view ("" for an objective with one)
    objective: Objective  # what the view evaluates with: `objective.view(name)`
    copies: int  # noisy copies of each window (1 unless the view's loss is a Monte-Carlo estimate)

    @property
    def kind(self) -> str:
        """"elbo" (a Monte-Carlo bound) or "nll"."""
        return "elbo" if self.objective.monte_carlo else "nll"


@dataclass(frozen=True)
class BatchLoss:
    """The loss of one batch of windows, as the way it is computed gives it: `total` [2] float64 (loss sum, tokens),
    or `values` [windows] float64, each window's per-token loss."""

    total: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ViewLoss:
    """One view's validation loss."""

    loss: float  # per token
    stderr: float  # over the windows: nan without per-window values or with one window
    windows: int


def reduce_losses(batches: Sequence[BatchLoss], windows: int) -> ViewLoss:
    """A view's loss from its batches: sum / tokens of the (sum, tokens) pairs where every batch has them, else the
    mean of the windows' values; the standard error from the windows' values where there are any."""
    se = float("nan")
    if all(b.values is not None for b in batches):
        v = torch.cat([b.values for b in batches])
        se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        if not all(b.total is not None for b in batches):
            return ViewLoss(float(v.mean()), se, windows)
    if not all(b.total is not None for b in batches):
        raise ValueError("a view's batches report either (sum, tokens) or per-window values, not both")
    total = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        total += b.total.double()
    return ViewLoss(float(total[0] / total[1]) if total[1] > 0 else float("nan"), se, windows)


class Validation:
    """What one validation of a model under `objective` computes: each of its views over windows 0..windows-1, in
    batches of `batch_windows`, with `mc_samples` copies of each window for a Monte-Carlo view."""

    def __init__(self, objective: Objective, windows: int, batch_windows: int, mc_samples: int = 1):
        self.windows, self.batch_windows = int(windows), int(batch_windows)
        views = []
        for name in objective.evaluation_views:
            view = objective.view(name)
            copies = int(mc_samples) if view.monte_carlo else 1
            if copies < 1:
                raise ConfigError(f"--mc-samples must be >= 1, got {mc_samples}")
            views.append(View(name, view, copies))
        self.views: tuple[View, ...] = tuple(views)

    @classmethod
    def of_training(cls, objective: Objective, eval_iters: int, global_batch_size: int) -> "Validation":
        """The trainer's: `eval_iters` global batches, one copy of each window."""
        return cls(objective, eval_iters * global_batch_size, global_batch_size)

    def batches(self) -> list[tuple[int, int]]:
        """(first window, windows) of each batch, in order."""
        return [(start, min(self.batch_windows, self.windows - start))
                for start in range(0, self.windows, self.batch_windows)]

    def run(self, measure: Callable[[View, int, int], BatchLoss]) -> dict[str, ViewLoss]:
        """{view name: its loss} in the objective's order (the first is the validation loss); `measure(view, start,
        size)` computes one batch of windows (collective where it is: every rank then calls `run`)."""
        return {view.name: reduce_losses([measure(view, start, size) for start, size in self.batches()], self.windows)
                for view in self.views}

    def record(self, losses: dict[str, ViewLoss], fields: Callable[[ViewLoss], dict], **extra) -> dict:
        """`fields` of the first view's loss (the validation loss), then `extra`, then with several views each
        one's `fields` again, suffixed `_<view>`."""
        out = {**fields(losses[self.views[0].name]), **extra}
        if len(self.views) > 1:
            for view in self.views:
                out.update({f"{key}_{view.name}": value for key, value in fields(losses[view.name]).items()})
        return out


# ----------------------------------------------------------------------------------------------
# Evaluation of a checkpoint in this process


def window_losses(scorer: ModelScorer, objective: Objective, tokens: torch.Tensor, window_index: torch.Tensor,
                  copies: int = 1) -> BatchLoss:
    """The loss of windows `tokens` [w, seq + 1] (clean; window_index [w] int64) under `objective` (one view): each
    window's per-token loss (the mean of its `copies` noisy copies) and the batch's (loss sum, tokens), which
    differ from the values' mean where windows count different tokens (--eod-mask-loss).  The model sees the
    batch's position ids and attention mask as the trainer's forward step hands them (packed documents, the dual
    objective's AR rows)."""
    batch = objective.prepare_evaluation(tokens, window_index.to(torch.int64), copies)
    lp = scorer.log_probs(batch.input_ids, batch.position_ids, batch.attention_mask, batch.row_mask)
    ce = -lp.gather(-1, batch.labels[..., None].to(lp.device))[..., 0].double()
    sums, counts = objective.row_totals(ce, batch)
    sums, counts = sums.view(tokens.shape[0], copies), counts.view(tokens.shape[0], copies)
    values = (sums / counts).mean(-1)
    return BatchLoss(total=torch.stack([sums.sum(), counts.sum()]).cpu(), values=values.cpu())


def validation_loss(scorers: Mapping[str, ModelScorer], objective: Objective, data,
                    num_windows: Optional[int] = None, mc_samples: int = 1, windows_per_batch: int = 8) -> dict:
    """{val_loss, val_loss_stderr, tokens, windows, mc_samples, kind} of `objective`'s first view over the first
    `num_windows` windows of `data`'s validation split (default: all), and with several views (dual) each one's
    val_loss_<view> and val_loss_stderr_<view>; `scorers[view]` is the model a view is scored with."""
    total = data.valid_samples
    if total == 0:
        raise DataError("the validation split is empty; give --split with a validation part")
    n = total if num_windows is None else min(int(num_windows), total)
    validation = Validation(objective, n, windows_per_batch, mc_samples)

    def measure(view: View, start: int, size: int) -> BatchLoss:
        batch = data.valid_batch(start, size)
        return window_losses(scorers[view.name], view.objective, batch["tokens"], batch["sample_index"], view.copies)

    losses = validation.run(measure)
    first = validation.views[0]
    seq = data.valid_batch(0, 1)["tokens"].shape[1] - 1
    return validation.record(losses, lambda r: {"val_loss": r.loss, "val_loss_stderr": r.stderr},
                             tokens=n * seq, windows=n, mc_samples=first.copies if first.objective.monte_carlo else 0,
                             kind=first.kind)
