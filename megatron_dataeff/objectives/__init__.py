"""Training objectives: AR, AR with token dropout, masked diffusion (one contract, see base.py)."""

from megatron_dataeff.objectives.ar import AutoregressiveObjective
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch
from megatron_dataeff.objectives.mdm import MaskedDiffusionObjective
from megatron_dataeff.objectives.token_dropout import TokenDropoutObjective


def build_objective(cfg, mask_token_id: int) -> Objective:
    """The objective of a RunConfig."""
    o = cfg.objective
    seed = cfg.optim.seed
    if o.diffusion:
        group = cfg.optim.global_batch_size if o.mdm_stratified else 0
        return MaskedDiffusionObjective(mask_token_id, seed, eps=o.mdm_eps, stratify_group=group or 0)
    if o.token_dropout_rate > 0:
        return TokenDropoutObjective(mask_token_id, seed, o.token_dropout_rate, o.token_dropout_schedule)
    return AutoregressiveObjective(mask_token_id, seed)


__all__ = ["Objective", "ObjectiveBatch", "AutoregressiveObjective", "TokenDropoutObjective",
           "MaskedDiffusionObjective", "build_objective"]
