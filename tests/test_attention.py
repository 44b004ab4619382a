"""Masked diffusion attends both ways, AR only backwards (real megatron-core GPTModel)."""

import pytest
import torch

from megatron_dataeff.config import build_parser, config_from_args
from megatron_dataeff.models.builder import build_model


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_late_token_changes_early_logits_only_in_mdm(megatron_cpu, objective):
    """Changing the last token changes logits at earlier positions iff the objective is mdm."""
    cfg = config_from_args(build_parser().parse_args(["--objective", objective, "--num-layers", "2"]))
    cfg.validate_layout(1)
    model = build_model(cfg, 258, "cpu").eval()
    x = torch.randint(0, 258, (2, 12))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 258
    with torch.no_grad():
        a, b = model(x, pos, None), model(y, pos, None)
    early = (a[:, :-1] - b[:, :-1]).abs().max().item()
    if objective == "mdm":
        assert early > 1e-4
    else:
        assert early == 0.0
    assert (a[:, -1] - b[:, -1]).abs().max().item() > 1e-4


def test_mlp_dropout_sits_on_the_inner_activation(megatron_cpu):
    """--mlp-dropout puts dropout on linear_fc2's input: train outputs vary, eval outputs do not."""
    cfg = config_from_args(build_parser().parse_args(["--mlp-dropout", "0.5", "--num-layers", "1"]))
    cfg.validate_layout(1)
    model = build_model(cfg, 258, "cpu")
    fc2 = model.decoder.layers[0].mlp.linear_fc2
    assert type(fc2).__name__.startswith("InputDropout") and fc2.input_dropout == 0.5
    x = torch.randint(0, 258, (1, 8))
    pos = torch.arange(8).unsqueeze(0)
    model.train()
    assert not torch.equal(model(x, pos, None), model(x, pos, None))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, pos, None), model(x, pos, None))
