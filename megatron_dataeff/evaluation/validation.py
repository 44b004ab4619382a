"""Validation loss of a checkpoint on the fixed validation windows, with its standard error.

AR models: the next-token NLL per token of each window (clean input, as in training's validation).
Masked-diffusion models: the ELBO per token, estimated with n Monte-Carlo samples per window whose
mask rates are stratified over [0, 1) (t_j = (j + u) / n), p = (1 - eps) t + eps, loss = Σ over
masked tokens of CE / p, divided by the window length.  Noise comes from the trainer's evaluation
Philox stream keyed by (seed, window * n + j), so `--mc-samples 1` reproduces the validation loss
the trainer logged for the same windows and seed.

`val_loss` is the mean over windows of the per-window loss; `val_loss_stderr` is the standard
deviation of the per-window values over √windows: it covers the choice of validation text and, for
diffusion, the Monte-Carlo noise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_dataeff.evaluation.scoring import ModelScorer
from megatron_dataeff.ops import philox
from megatron_dataeff.ops.masking import mask_tokens


def window_losses(scorer: ModelScorer, tokens: torch.Tensor, window_index: torch.Tensor,
                  mc_samples: int = 1) -> torch.Tensor:
    """[w] per-token loss of each window; tokens [w, seq + 1] clean, window_index [w] int64."""
    if not scorer.diffusion:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        lp = scorer.log_probs(inputs)
        nll = -lp.gather(-1, labels[..., None])[..., 0].double()
        return nll.mean(-1)
    n = int(mc_samples)
    if n < 1:
        raise ValueError("mc_samples must be >= 1")
    x0 = tokens[:, :-1]
    w, s = x0.shape
    rep = x0.repeat_interleave(n, 0)
    index = (window_index.repeat_interleave(n) * n + torch.arange(n).repeat(w)).to(torch.int64)
    masked = mask_tokens(rep, index, scorer.seed, mode="mdm", eps=scorer.eps,
                         mask_token_id=scorer.mask_token_id, stratify_group=n,
                         stream_offset=philox.EVAL_STREAM_OFFSET)
    lp = scorer.log_probs(masked.input_ids)
    ce = -lp.gather(-1, rep[..., None])[..., 0].double()
    per_sample = (ce * masked.weight.double()).sum(-1) / s
    return per_sample.view(w, n).mean(-1)


def validation_loss(scorer: ModelScorer, data, num_windows: Optional[int] = None, mc_samples: int = 1,
                    windows_per_batch: int = 8) -> dict:
    """{val_loss, val_loss_stderr, tokens, windows, mc_samples} over the first `num_windows` windows."""
    total = len(data.valid)
    if total == 0:
        raise ValueError("the validation split is empty; give --split with a validation part")
    n = total if num_windows is None else min(int(num_windows), total)
    values = []
    for start in range(0, n, windows_per_batch):
        batch = data.valid_batch(start, min(windows_per_batch, n - start))
        values.append(window_losses(scorer, batch["tokens"], batch["sample_index"], mc_samples))
    v = torch.cat(values)
    seq = data.valid.window - 1
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"val_loss": float(v.mean()), "val_loss_stderr": se, "tokens": int(len(v) * seq),
            "windows": int(len(v)), "mc_samples": int(mc_samples) if scorer.diffusion else 0,
            "kind": "elbo" if scorer.diffusion else "nll"}
