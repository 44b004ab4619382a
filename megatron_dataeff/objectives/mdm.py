"""Masked diffusion (LLaDA / SMDM / Prabhudesai et al. convention).

Per sequence t ~ U(0, 1), p = (1 - eps) t + eps (in training (t_max - t_min) t + t_min with a clipped schedule,
--mdm-t-min / --mdm-t-max); each token is replaced by the mask token with
probability p; the model (bidirectional) predicts the clean tokens; the loss is the sum over masked
positions of CE / p, divided by batch x length.  That is a Monte-Carlo estimate of the negative
ELBO per token.  Evaluation uses a fixed noise stream keyed by the validation sample index, so
validation curves are comparable across steps and runs.
"""

from __future__ import annotations

from megatron_dataeff.lazy import lazy_module
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch

torch = lazy_module("torch")
philox = lazy_module("megatron_dataeff.ops.philox")
masking = lazy_module("megatron_dataeff.ops.masking")


def schedule_note(eps: float, t_min: float, t_max: float) -> str:
    """The start-up line's note of a clipped training schedule ("" for the whole [eps, 1))."""
    if (t_min, t_max) == (eps, 1.0):
        return ""
    return f", clipped schedule: training rates in [{t_min:g}, {t_max:g}), validation in [{eps:g}, 1)"


class MaskedDiffusionObjective(Objective):
    """Predict masked tokens of the window tokens[:, :-1] from the rest, both directions."""

    name = "mdm"
    bidirectional = True
    diffusion = True
    monte_carlo = True

    def __init__(self, mask_token_id: int, seed: int, eps: float = 1e-3, stratify_group: int = 0,
                 t_min: float | None = None, t_max: float = 1.0):
        super().__init__(mask_token_id, seed)
        self.eps = float(eps)
        self.stratify_group = int(stratify_group)
        # training's rates lie in [t_min, t_max) (a clipped schedule when not [eps, 1)); evaluation's in [eps, 1)
        self.t_min, self.t_max = (self.eps if t_min is None else float(t_min)), float(t_max)

    @classmethod
    def from_config(cls, cfg, mask_token_id, vocab_ids=None, train_iters=None):
        o = cfg.objective
        return cls(mask_token_id, cfg.optim.seed, eps=o.mdm_eps,
                   stratify_group=cfg.optim.global_batch_size if o.mdm_stratified else 0, t_min=o.t_min,
                   t_max=o.mdm_t_max)

    @classmethod
    def input_noise(cls, ocfg):
        return "mask", None

    def describe(self) -> str:
        return self.name + schedule_note(self.eps, self.t_min, self.t_max)

    def prepare(self, tokens, sample_index, *, evaluation=False):
        return self._masked(tokens, sample_index, evaluation,
                            stratify_group=0 if evaluation else self.stratify_group)

    def prepare_evaluation(self, tokens, window_index, copies=1):
        """`copies` masked copies of each window with their mask rates stratified over [0, 1)
        (t_j = (j + u) / copies): a lower-variance Monte-Carlo ELBO; one copy is the trainer's validation."""
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        n = int(copies)
        rows = tokens.repeat_interleave(n, 0)
        index = window_index.to(torch.int64).repeat_interleave(n) * n + torch.arange(n).repeat(tokens.shape[0])
        return self._masked(rows, index, True, stratify_group=n)

    def _masked(self, tokens, sample_index, evaluation: bool, stratify_group: int):
        x0 = tokens[:, :-1].contiguous()
        lo, hi = (self.eps, 1.0) if evaluation else (self.t_min, self.t_max)
        masked = masking.mask_tokens(
            x0, sample_index, self.seed, mode="mdm", eps=lo, rate=hi, mask_token_id=self.mask_token_id,
            stratify_group=stratify_group, stream_offset=philox.EVAL_STREAM_OFFSET if evaluation else 0,
        )
        keep = self._loss_keep(x0)
        weight = masked.weight if keep is None else masked.weight * keep.to(masked.weight.device)
        batch = ObjectiveBatch(input_ids=masked.input_ids, labels=x0, loss_weight=weight,
                               num_tokens=self._count(x0, keep), mask=masked.mask, row_tokens=self._row_tokens(keep))
        return self._with_documents(batch, x0, causal=False)
