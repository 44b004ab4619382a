"""Masked diffusion (LLaDA / SMDM / Prabhudesai et al. convention).

Per sequence t ~ U(0, 1), p = (1 - eps) t + eps; each token is replaced by the mask token with
probability p; the model (bidirectional) predicts the clean tokens; the loss is the sum over masked
positions of CE / p, divided by batch x length.  That is a Monte-Carlo estimate of the negative
ELBO per token.  Evaluation uses a fixed noise stream keyed by the validation sample index, so
validation curves are comparable across steps and runs.
"""

from __future__ import annotations

from megatron_dataeff.objectives.base import Objective, ObjectiveBatch
from megatron_dataeff.ops import philox
from megatron_dataeff.ops.masking import mask_tokens


class MaskedDiffusionObjective(Objective):
    """Predict masked tokens of the window tokens[:, :-1] from the rest, both directions."""

    name = "mdm"
    bidirectional = True

    def __init__(self, mask_token_id: int, seed: int, eps: float = 1e-3, stratify_group: int = 0):
        super().__init__(mask_token_id, seed)
        self.eps = float(eps)
        self.stratify_group = int(stratify_group)

    def prepare(self, tokens, sample_index, *, evaluation=False):
        x0 = tokens[:, :-1].contiguous()
        masked = mask_tokens(
            x0, sample_index, self.seed, mode="mdm", eps=self.eps, mask_token_id=self.mask_token_id,
            stratify_group=0 if evaluation else self.stratify_group,
            stream_offset=philox.EVAL_STREAM_OFFSET if evaluation else 0,
        )
        return ObjectiveBatch(input_ids=masked.input_ids, labels=x0, loss_weight=masked.weight,
                              num_tokens=x0.numel(), mask=masked.mask)
