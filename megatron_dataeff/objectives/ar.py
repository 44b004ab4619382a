"""Autoregressive next-token prediction: causal attention, cross-entropy on every position."""

from __future__ import annotations

from megatron_dataeff.lazy import lazy_module
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch

torch = lazy_module("torch")


class AutoregressiveObjective(Objective):
    """Input tokens[:, :-1], labels tokens[:, 1:], all positions weighted 1."""

    name = "ar"
    bidirectional = False

    def corrupt_inputs(self, inputs: torch.Tensor, sample_index: torch.Tensor, evaluation: bool):
        """(inputs, mask) the model sees; plain AR leaves them clean."""
        return inputs, None

    def prepare(self, tokens, sample_index, *, evaluation=False):
        clean, labels = tokens[:, :-1], tokens[:, 1:]
        inputs, mask = self.corrupt_inputs(clean, sample_index, evaluation)
        keep = self._loss_keep(clean)
        weight = keep if keep is not None else torch.ones(labels.shape, dtype=torch.float32, device=tokens.device)
        batch = ObjectiveBatch(input_ids=inputs.contiguous(), labels=labels.contiguous(), loss_weight=weight,
                               num_tokens=self._count(clean, keep), mask=mask, row_tokens=self._row_tokens(keep))
        return self._with_documents(batch, clean, causal=True)
