"""The trainer's validation: --eval-iters fixed global batches of the validation split through the objective's
every view (AR: the clean NLL; mdm: the ELBO with fixed noise; dual: both, `loss` the AR NLL), the record in
metrics.jsonl, the console line, and the run's last and best validation (kept in checkpoints)."""

from __future__ import annotations

import math
import time

import torch

from megatron_dataeff.training.forward_backward import ForwardBackward
from megatron_dataeff.training.metrics import MetricsLogger


class Validator:
    """Validates with `forward_backward` on `valid_batch(start, size)` (collective: every rank calls it)."""

    def __init__(self, forward_backward: ForwardBackward, valid_batch, log: MetricsLogger, *, eval_iters: int,
                 tokens_per_batch: int, synced):
        self.fb, self.valid_batch, self.log = forward_backward, valid_batch, log
        self.eval_iters, self.tokens_per_batch = eval_iters, tokens_per_batch
        self.synced = synced  # a context in which the parameters are all-gathered (build.params_synced)

    def evaluate(self) -> dict:
        """{"loss": the first view's, "tokens_per_s", and "loss_<view>" of each view when there are several}."""
        objective = self.fb.objective
        for m in self.fb.model:
            m.eval()
        t0 = time.time()
        views = objective.evaluation_views
        totals = {view: torch.zeros(2, dtype=torch.float64) for view in views}
        with torch.no_grad(), self.synced():
            for view in views:
                for k in range(self.eval_iters):
                    totals[view] += self.fb.run(self.valid_batch, k, forward_only=True, view=view)
        for m in self.fb.model:
            m.train()
        elapsed = time.time() - t0
        tokens = len(views) * self.eval_iters * self.tokens_per_batch
        losses = {view: float(t[0] / t[1]) if t[1] > 0 else float("nan") for view, t in totals.items()}
        out = {"loss": losses[views[0]], "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if len(views) > 1:
            out.update({f"loss_{view}": value for view, value in losses.items()})
        return out

    def log_validation(self, iteration: int, epoch: float, consumed_tokens: int, record: dict) -> dict:
        """Validate, log the record and line; returns the run's {"last", "best"} validation updated from `record`
        (the previous one)."""
        res = self.evaluate()
        rec = {"iteration": iteration, "split": "valid", "tokens_per_s": res["tokens_per_s"], "epoch": epoch,
               "consumed_tokens": consumed_tokens, **{k: v for k, v in res.items() if k.startswith("loss")}}
        self.log.log(rec)
        best = record.get("best")
        objective = self.fb.objective
        views = objective.evaluation_views
        if len(views) > 1:
            shown = " | ".join(f"val {'ELBO' if objective.view(v).monte_carlo else 'AR NLL'} {res[f'loss_{v}']:.4f}"
                               for v in views)
        else:
            shown = f"{'val ELBO' if objective.monte_carlo else 'val loss'} {res['loss']:.4f}"
        self.log.print(f" validation | iteration {iteration:7d} | {shown} | ppl {math.exp(min(res['loss'], 50)):.2f}")
        return {"last": rec, "best": rec if best is None or rec["loss"] < best["loss"] else best}
