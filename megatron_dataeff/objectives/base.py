"""The objective contract: corrupt a batch of clean tokens, then turn per-token losses into a loss.

Every objective maps clean token windows `tokens` [batch, seq + 1] and their global sample indices
[batch] to an `ObjectiveBatch`: the model input, the labels, and a per-token loss weight.  The
model returns per-token cross-entropy [batch, seq]; the micro-batch's loss is
`sum(ce * weight)` over `num_tokens` tokens.  Losses are reported as (sum, count) pairs, so the
global-batch loss is the same however the batch is split over ranks and micro-batches.

All noise comes from `ops.masking.mask_tokens`, keyed by (seed, global sample index).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass
class ObjectiveBatch:
    """What the model sees and how its per-token losses are weighted."""

    input_ids: torch.Tensor  # [batch, seq] model input (possibly corrupted)
    labels: torch.Tensor  # [batch, seq] targets
    loss_weight: torch.Tensor  # [batch, seq] float32 weight of each position's cross-entropy
    num_tokens: int  # the loss normaliser of this micro-batch
    mask: torch.Tensor | None = None  # [batch, seq] bool, positions replaced by the mask token


class Objective(abc.ABC):
    """Corrupt the batch, weight the loss."""

    name: str = ""
    bidirectional: bool = False

    def __init__(self, mask_token_id: int, seed: int):
        self.mask_token_id = int(mask_token_id)
        self.seed = int(seed)

    @abc.abstractmethod
    def prepare(self, tokens: torch.Tensor, sample_index: torch.Tensor, *, evaluation: bool = False
                ) -> ObjectiveBatch:
        """tokens [batch, seq + 1] (clean), sample_index [batch] int64 -> ObjectiveBatch."""

    def loss(self, per_token_loss: torch.Tensor, batch: ObjectiveBatch) -> tuple[torch.Tensor, int]:
        """(weighted loss sum, num_tokens) of a micro-batch from per-token cross-entropy [batch, seq]."""
        weight = batch.loss_weight.to(device=per_token_loss.device)
        return (per_token_loss.float() * weight).sum(), batch.num_tokens
