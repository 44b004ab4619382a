"""The objective registry: --objective and its flags select one class, the one home of the objective's traits."""

import pytest

from megatron_dataeff.config import ObjectiveConfig, RunConfig, field_specs
from megatron_dataeff.objectives import (OBJECTIVE_NAMES, REGISTRY, AutoregressiveObjective, BlockDiffusionObjective,
                                         DualObjective,
                                         MaskedDiffusionObjective, TokenDropoutObjective, build_objective,
                                         objective_class)
from megatron_dataeff.training import flops


@pytest.mark.parametrize("flags, cls", [
    ({}, AutoregressiveObjective),
    ({"token_dropout_rate": 0.3}, TokenDropoutObjective),
    ({"token_dropout_anneal": "linear", "token_dropout_final_rate": 0.2}, TokenDropoutObjective),
    ({"name": "mdm"}, MaskedDiffusionObjective),
    ({"name": "dual"}, DualObjective),
])
def test_flags_select_one_class(flags, cls):
    """Each --objective (with its token-dropout flags) is trained by exactly the class the registry names."""
    ocfg = ObjectiveConfig(**flags)
    assert objective_class(ocfg) is cls
    cfg = RunConfig(objective=ocfg)
    assert type(build_objective(cfg, mask_token_id=5, vocab_ids=6, train_iters=10)) is cls


def test_objective_choices_are_the_registry_names():
    """--objective's choices are read from the registry, not written down a second time."""
    (spec,) = [s for s in field_specs(ObjectiveConfig) if s.name == "name"]
    assert spec.choices == OBJECTIVE_NAMES == ("ar", "mdm", "dual", "block")
    assert all(cls.name in OBJECTIVE_NAMES for cls in REGISTRY)


def test_traits_of_each_objective():
    """Attention, diffusion, row masks, views and rows per sample, as the builder, trainer and estimates read them."""
    assert not AutoregressiveObjective.bidirectional and not AutoregressiveObjective.diffusion
    assert MaskedDiffusionObjective.bidirectional and MaskedDiffusionObjective.diffusion
    assert DualObjective.bidirectional and DualObjective.row_attention_masks and not DualObjective.diffusion
    assert DualObjective.evaluation_views == ("ar", "mdm")
    block = ObjectiveConfig(name="block", block_size=4)
    assert objective_class(block) is BlockDiffusionObjective and BlockDiffusionObjective.diffusion
    assert BlockDiffusionObjective.row_attention_masks and BlockDiffusionObjective.token_positions
    assert BlockDiffusionObjective.sequence_multiple(block) == 2 and MaskedDiffusionObjective.sequence_multiple(block) == 1
    mir = ObjectiveConfig(token_dropout_rate=0.3, token_dropout_aux_weight=0.5)
    assert objective_class(mir).rows_per_sample(mir) == 2
    assert objective_class(ObjectiveConfig(token_dropout_rate=0.3)).rows_per_sample(ObjectiveConfig()) == 1
    assert AutoregressiveObjective.input_noise(ObjectiveConfig()) is None
    td = ObjectiveConfig(token_dropout_rate=0.3, token_dropout_noise="random", token_dropout_span=3.0)
    assert objective_class(td).input_noise(td) == ("random", 3.0)


def test_flops_follow_the_objectives_attention():
    """A bidirectional objective's attention covers the whole sequence (more FLOPs than AR's causal half); MIR counts
    both of its rows."""
    def step(**flags):
        cfg = RunConfig(objective=ObjectiveConfig(**flags))
        cfg.validate_layout(1)
        return flops.flops_per_step(cfg, 256)

    ar, mdm, dual = step(), step(name="mdm"), step(name="dual")
    assert mdm > ar and dual == mdm
    assert step(token_dropout_rate=0.3, token_dropout_aux_weight=0.5) == 2 * ar  # MIR: clean and corrupted rows
