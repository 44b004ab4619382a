"""Training objectives: AR, AR with token dropout, masked diffusion, dual (one contract, see base.py)."""

from __future__ import annotations

from megatron_dataeff.objectives.ar import AutoregressiveObjective
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch
from megatron_dataeff.objectives.dual import DualObjective
from megatron_dataeff.objectives.mdm import MaskedDiffusionObjective
from megatron_dataeff.objectives.token_dropout import TokenDropoutObjective


def build_objective(cfg, mask_token_id: int, vocab_ids: int | None = None, train_iters: int | None = None
                    ) -> Objective:
    """The objective of a RunConfig.  Training needs `vocab_ids` (random-token noise) and `train_iters` (an
    annealed token-dropout rate); evaluation, which never corrupts AR inputs, does not."""
    o = cfg.objective
    seed = cfg.optim.seed
    if o.dual:
        return DualObjective(mask_token_id, seed, ar_fraction=o.ar_fraction, eps=o.mdm_eps)
    if o.diffusion:
        group = cfg.optim.global_batch_size if o.mdm_stratified else 0
        return MaskedDiffusionObjective(mask_token_id, seed, eps=o.mdm_eps, stratify_group=group or 0)
    if o.token_dropout:
        return TokenDropoutObjective(
            mask_token_id, seed, o.token_dropout_rate, o.token_dropout_schedule, noise=o.token_dropout_noise,
            span=o.token_dropout_span, anneal=o.token_dropout_anneal, final_rate=o.token_dropout_final_rate,
            aux_weight=o.token_dropout_aux_weight, vocab_ids=vocab_ids, train_iters=train_iters,
            global_batch_size=cfg.optim.global_batch_size)
    return AutoregressiveObjective(mask_token_id, seed)


__all__ = ["Objective", "ObjectiveBatch", "AutoregressiveObjective", "TokenDropoutObjective",
           "MaskedDiffusionObjective", "DualObjective", "build_objective"]
