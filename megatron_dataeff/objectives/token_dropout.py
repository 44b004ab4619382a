"""AR with token dropout: input tokens replaced by the mask token, clean next-token targets.

`fixed`: each input token is masked with probability R.  `uniform`: each sequence draws
r ~ U(0, R) and masks with probability r (at R = 1 this is the paper's "diffusion-style masked
input").  The loss covers every position with weight 1, no 1/(1-p) rescaling, and evaluation
sees clean input.
"""

from __future__ import annotations

from megatron_dataeff.objectives.ar import AutoregressiveObjective
from megatron_dataeff.ops.masking import mask_tokens


class TokenDropoutObjective(AutoregressiveObjective):
    """AR whose inputs are corrupted in training."""

    name = "ar+token_dropout"

    def __init__(self, mask_token_id: int, seed: int, rate: float, schedule: str = "fixed"):
        super().__init__(mask_token_id, seed)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"token dropout rate must be in [0, 1], got {rate}")
        if schedule not in ("fixed", "uniform"):
            raise ValueError(f"token dropout schedule must be fixed or uniform, got {schedule!r}")
        self.rate, self.schedule = float(rate), schedule

    def corrupt_inputs(self, inputs, sample_index, evaluation):
        if evaluation or self.rate == 0.0:
            return inputs, None
        masked = mask_tokens(inputs, sample_index, self.seed, mode=self.schedule, rate=self.rate,
                             mask_token_id=self.mask_token_id)
        return masked.input_ids, masked.mask
