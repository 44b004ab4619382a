"""Validation loss of a checkpoint on the fixed validation windows, with its standard error.

The loss is the objective's own: each window batch goes through the run's objective
(`prepare_evaluation`, then `sample_losses`), exactly as the trainer's validation does
(`prepare(..., evaluation=True)` + `loss`).  AR models: the next-token NLL per token of each window, on
clean input.  Masked-diffusion models: the ELBO per token, estimated with n Monte-Carlo copies per
window whose mask rates are stratified over [0, 1), noise from the trainer's evaluation Philox stream,
so `--mc-samples 1` reproduces the validation loss the trainer logged for the same windows and seed.

`val_loss` is the mean over windows of the per-window loss; `val_loss_stderr` is the standard
deviation of the per-window values over sqrt(windows): it covers the choice of validation text and,
for diffusion, the Monte-Carlo noise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_dataeff.errors import ConfigError, DataError
from megatron_dataeff.evaluation.scoring import ModelScorer
from megatron_dataeff.objectives import Objective


def window_losses(scorer: ModelScorer, objective: Objective, tokens: torch.Tensor, window_index: torch.Tensor,
                  mc_samples: int = 1) -> torch.Tensor:
    """[w] per-token loss of each window; tokens [w, seq + 1] clean, window_index [w] int64."""
    copies = int(mc_samples) if objective.monte_carlo else 1
    if copies < 1:
        raise ConfigError(f"--mc-samples must be >= 1, got {mc_samples}")
    batch = objective.prepare_evaluation(tokens, window_index.to(torch.int64), copies)
    lp = scorer.log_probs(batch.input_ids)
    ce = -lp.gather(-1, batch.labels[..., None].to(lp.device))[..., 0].double()
    return objective.sample_losses(ce, batch).view(tokens.shape[0], copies).mean(-1)


def validation_loss(scorer: ModelScorer, objective: Objective, data, num_windows: Optional[int] = None,
                    mc_samples: int = 1, windows_per_batch: int = 8) -> dict:
    """{val_loss, val_loss_stderr, tokens, windows, mc_samples} over the first `num_windows` windows."""
    total = data.valid_samples
    if total == 0:
        raise DataError("the validation split is empty; give --split with a validation part")
    n = total if num_windows is None else min(int(num_windows), total)
    values = []
    for start in range(0, n, windows_per_batch):
        batch = data.valid_batch(start, min(windows_per_batch, n - start))
        values.append(window_losses(scorer, objective, batch["tokens"], batch["sample_index"], mc_samples))
    v = torch.cat(values)
    seq = batch["tokens"].shape[1] - 1
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"val_loss": float(v.mean()), "val_loss_stderr": se, "tokens": int(len(v) * seq),
            "windows": int(len(v)), "mc_samples": int(mc_samples) if objective.monte_carlo else 0,
            "kind": "elbo" if objective.monte_carlo else "nll"}
