"""AR with token dropout: dropped input tokens are replaced, the next-token targets stay clean.

`fixed`: each input token is dropped with probability R.  `uniform`: each sequence draws r ~ U(0, R)
and drops with probability r (at R = 1 this is the paper's "diffusion-style masked input").  What
replaces a dropped token (`noise`: the mask token, a random token, BERT's 80/10/10 mix) and which tokens
are dropped (independent positions, or geometric `span`s) are `ops.corruption`'s.  `anneal` moves R over
training (linear or cosine, to `final_rate` at the last step), keyed by the sample's step (global sample
index // global batch), so every layout and resume sees the same rate.  The loss covers every position
with weight 1, no 1/(1-p) rescaling, and evaluation sees clean input.

With `aux_weight` W > 0 (masked-input regularisation, MIR): the clean inputs are kept and each sample
also appears with dropped inputs, in the same micro-batch (rows [clean; corrupted]); the loss is the
clean next-token loss + W x the corrupted rows' loss, both per token of the clean batch, and the two
halves are reported as `clean` and `corrupted`.
"""

from __future__ import annotations

import math

from megatron_dataeff.lazy import lazy_module
from megatron_dataeff.objectives.ar import AutoregressiveObjective
from megatron_dataeff.objectives.base import ObjectiveBatch

torch = lazy_module("torch")
corruption = lazy_module("megatron_dataeff.ops.corruption")


class TokenDropoutObjective(AutoregressiveObjective):
    """AR whose inputs are corrupted in training."""

    name = "ar"

    def __init__(self, mask_token_id: int, seed: int, rate: float, schedule: str = "fixed", *,
                 noise: str = "mask", span: float | None = None, anneal: str = "none", final_rate: float = 0.0,
                 aux_weight: float = 0.0, vocab_ids: int | None = None, train_iters: int | None = None,
                 global_batch_size: int | None = None):
        super().__init__(mask_token_id, seed)
        # The values are ObjectiveConfig's, checked there by flag name; the ops check what they draw with.
        self.rate, self.schedule = float(rate), schedule
        self.noise, self.span = noise, span
        self.anneal, self.final_rate = anneal, float(final_rate)
        self.aux_weight = float(aux_weight)
        self.vocab_ids = vocab_ids
        self.train_iters, self.global_batch_size = train_iters, global_batch_size
        self.part_names = ("clean", "corrupted") if self.aux_weight > 0 else ()

    @classmethod
    def selects(cls, ocfg) -> bool:
        """A token-dropout rate above 0 (or an annealed final rate above 0)."""
        return ocfg.token_dropout_rate > 0 or (ocfg.token_dropout_anneal != "none" and ocfg.token_dropout_final_rate > 0)

    @classmethod
    def from_config(cls, cfg, mask_token_id, vocab_ids=None, train_iters=None):
        o = cfg.objective
        return cls(mask_token_id, cfg.optim.seed, o.token_dropout_rate, o.token_dropout_schedule,
                   noise=o.token_dropout_noise, span=o.token_dropout_span, anneal=o.token_dropout_anneal,
                   final_rate=o.token_dropout_final_rate, aux_weight=o.token_dropout_aux_weight, vocab_ids=vocab_ids,
                   train_iters=train_iters, global_batch_size=cfg.optim.global_batch_size)

    @classmethod
    def rows_per_sample(cls, ocfg) -> int:
        """2 with --token-dropout-aux-weight (MIR: clean and corrupted rows), else 1."""
        return 2 if ocfg.token_dropout_aux_weight > 0 else 1

    @classmethod
    def input_noise(cls, ocfg):
        return ocfg.token_dropout_noise, ocfg.token_dropout_span

    def describe(self) -> str:
        parts = [f"ar + token dropout {self.rate:g} ({self.schedule})"]
        if self.anneal != "none":
            parts.append(f"annealed ({self.anneal}) to {self.final_rate:g}")
        if self.noise != "mask":
            parts.append(f"{self.noise} noise")
        if self.span is not None:
            parts.append(f"spans of mean {self.span:g}")
        if self.aux_weight:
            parts.append(f"as an auxiliary loss of weight {self.aux_weight:g} beside the clean loss (MIR)")
        return ", ".join(parts)

    def rate_at(self, step: int) -> float:
        """The token dropout rate R of training step `step` (0-based)."""
        if self.anneal == "none":
            return self.rate
        t = min(1.0, step / max(1, self.train_iters - 1))
        f = t if self.anneal == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
        return self.rate + (self.final_rate - self.rate) * f

    def _corrupt(self, inputs: torch.Tensor, sample_index: torch.Tensor):
        """(inputs with dropped tokens replaced, dropped [b, s] bool): training only, so an objective built for
        evaluation needs neither the vocabulary nor the schedule length."""
        if self.noise != "mask" and self.vocab_ids is None:
            raise ValueError(f"token dropout noise {self.noise!r} draws vocabulary ids: give vocab_ids")
        if self.anneal != "none" and (self.train_iters is None or self.global_batch_size is None):
            raise ValueError("an annealed token dropout rate needs train_iters and global_batch_size")
        if self.anneal == "none":
            rate = self.rate
        else:  # a micro-batch lies in one global batch, so one step: one rate
            steps = torch.unique(sample_index.to("cpu") // self.global_batch_size)
            if steps.numel() > 1:
                raise ValueError(f"a micro-batch spans training steps {steps.tolist()}: an annealed rate needs "
                                 f"the samples of one global batch")
            rate = self.rate_at(int(steps[0])) if steps.numel() else self.rate
        if rate == 0.0:
            return inputs, torch.zeros(inputs.shape, dtype=torch.bool, device=inputs.device)
        out = corruption.corrupt_tokens(
            inputs, sample_index, self.seed, mode=self.schedule, rate=rate, noise=self.noise, span=self.span,
            mask_token_id=self.mask_token_id,
            vocab_ids=self.vocab_ids if self.vocab_ids is not None else self.mask_token_id + 1)
        return out.input_ids, out.mask

    def corrupt_inputs(self, inputs, sample_index, evaluation):
        if evaluation or self.aux_weight > 0:
            return inputs, None
        return self._corrupt(inputs, sample_index)

    def prepare(self, tokens, sample_index, *, evaluation=False):
        clean = super().prepare(tokens, sample_index, evaluation=evaluation)
        if evaluation or self.aux_weight == 0:
            return clean
        corrupted, mask = self._corrupt(clean.input_ids, sample_index)
        return ObjectiveBatch(
            input_ids=torch.cat([clean.input_ids, corrupted]), labels=torch.cat([clean.labels, clean.labels]),
            loss_weight=torch.cat([clean.loss_weight, clean.loss_weight * self.aux_weight]),
            num_tokens=clean.num_tokens, mask=torch.cat([torch.zeros_like(mask), mask]),
            parts={name: (torch.cat([clean.loss_weight * (name == "clean"), clean.loss_weight * (name != "clean")]),
                          clean.num_tokens) for name in self.part_names},
            row_mask=clean.row_mask.repeat(2) if clean.row_mask is not None else None,
            position_ids=torch.cat([clean.position_ids] * 2) if clean.position_ids is not None else None)
