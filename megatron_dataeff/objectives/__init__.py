"""Training objectives: AR, AR with token dropout, masked diffusion, dual, block diffusion (one contract, see
base.py).

`REGISTRY` is the one list of objective classes: `--objective NAME` trains the first class of that name whose
`selects` accepts the run's flags (so a variant comes before its base).  Everything else asks the class
(`objective_class`) for the objective's traits.  A new objective is one module with an `Objective` subclass
plus its line here.
"""

from __future__ import annotations

from megatron_dataeff.objectives.ar import AutoregressiveObjective
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch
from megatron_dataeff.objectives.block import BlockDiffusionObjective
from megatron_dataeff.objectives.documents import DocumentFlags
from megatron_dataeff.objectives.dual import DualObjective
from megatron_dataeff.objectives.mdm import MaskedDiffusionObjective
from megatron_dataeff.objectives.token_dropout import TokenDropoutObjective

REGISTRY: tuple[type[Objective], ...] = (
    TokenDropoutObjective,  # --objective ar with a token-dropout rate
    AutoregressiveObjective,
    MaskedDiffusionObjective,
    DualObjective,
    BlockDiffusionObjective,
)
OBJECTIVE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(cls.name for cls in REGISTRY))  # --objective's choices


def objective_class(ocfg) -> type[Objective]:
    """The class that trains an ObjectiveConfig (the home of its traits)."""
    for cls in REGISTRY:
        if cls.name == ocfg.name and cls.selects(ocfg):
            return cls
    raise ValueError(f"no objective {ocfg.name!r}; known: {', '.join(OBJECTIVE_NAMES)}")


def build_objective(cfg, mask_token_id: int, vocab_ids: int | None = None, train_iters: int | None = None,
                    eod_token_id: int | None = None) -> Objective:
    """The objective of a RunConfig.  Training needs `vocab_ids` (random-token noise) and `train_iters` (an
    annealed token-dropout rate); evaluation, which never corrupts AR inputs, does not.  The document flags
    (--reset-position-ids, --reset-attention-mask, --eod-mask-loss) need the tokenizer's `eod_token_id`."""
    objective = objective_class(cfg.objective).from_config(cfg, mask_token_id, vocab_ids=vocab_ids,
                                                           train_iters=train_iters)
    objective.documents = DocumentFlags.from_config(cfg.data, eod_token_id)
    return objective


__all__ = ["Objective", "ObjectiveBatch", "AutoregressiveObjective", "TokenDropoutObjective",
           "MaskedDiffusionObjective", "DualObjective", "BlockDiffusionObjective", "DocumentFlags", "REGISTRY", "OBJECTIVE_NAMES", "objective_class",
           "build_objective"]
