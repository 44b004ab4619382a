"""The trainer's validation: the shared definition (`evaluation/validation.py`: the objective's views over
--eval-iters global batches of the validation split, with fixed noise) measured through megatron-core's (pipelined)
schedule on every rank, the record in metrics.jsonl, the console line, and the run's last and best validation
(kept in checkpoints)."""

from __future__ import annotations

import math
import time

import torch

from megatron_dataeff.evaluation.validation import BatchLoss, Validation, View
from megatron_dataeff.training.forward_backward import ForwardBackward
from megatron_dataeff.training.metrics import MetricsLogger


class Validator:
    """Validates with `forward_backward` on `valid_batch(start, size)` (collective: every rank calls it)."""

    def __init__(self, forward_backward: ForwardBackward, valid_batch, log: MetricsLogger, *, eval_iters: int,
                 global_batch_size: int, seq_length: int, synced):
        self.fb, self.valid_batch, self.log = forward_backward, valid_batch, log
        self.validation = Validation.of_training(forward_backward.objective, eval_iters, global_batch_size)
        self.global_batch_size, self.seq_length = global_batch_size, seq_length
        self.synced = synced  # a context in which the parameters are all-gathered (build.params_synced)

    def _measure(self, view: View, start: int, size: int) -> BatchLoss:
        """(loss sum, tokens) of one global batch of windows, the same on every rank (one copy of each window: the
        forward step prepares it with `prepare(..., evaluation=True)`)."""
        return BatchLoss(total=self.fb.run(self.valid_batch, start // self.global_batch_size, forward_only=True,
                                           view=view.name))

    def evaluate(self) -> dict:
        """{"loss": the first view's, "tokens_per_s", and "loss_<view>" of each view when there are several}."""
        for m in self.fb.model:
            m.eval()
        t0 = time.time()
        with torch.no_grad(), self.synced():
            losses = self.validation.run(self._measure)
        for m in self.fb.model:
            m.train()
        elapsed = time.time() - t0
        tokens = len(self.validation.views) * self.validation.windows * self.seq_length
        return self.validation.record(losses, lambda r: {"loss": r.loss}, tokens_per_s=tokens / max(elapsed, 1e-9))

    def log_validation(self, iteration: int, epoch: float, consumed_tokens: int, record: dict) -> dict:
        """Validate, log the record and line; returns the run's {"last", "best"} validation updated from `record`
        (the previous one)."""
        res = self.evaluate()
        rec = {"iteration": iteration, "split": "valid", "tokens_per_s": res["tokens_per_s"], "epoch": epoch,
               "consumed_tokens": consumed_tokens, **{k: v for k, v in res.items() if k.startswith("loss")}}
        self.log.log(rec)
        best = record.get("best")
        views = self.validation.views
        if len(views) > 1:
            shown = " | ".join(f"val {'ELBO' if v.kind == 'elbo' else 'AR NLL'} {res[f'loss_{v.name}']:.4f}"
                               for v in views)
        else:
            shown = f"{'val ELBO' if views[0].kind == 'elbo' else 'val loss'} {res['loss']:.4f}"
        self.log.print(f" validation | iteration {iteration:7d} | {shown} | ppl {math.exp(min(res['loss'], 50)):.2f}")
        return {"last": rec, "best": rec if best is None or rec["loss"] < best["loss"] else best}
