"""Masked diffusion attends both ways, AR only backwards (real megatron-core GPTModel)."""

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
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
    """--mlp-dropout: linear_fc2 sees dropout(silu(gate) * up) with the keyed mask; eval is deterministic."""
    from megatron_dataeff.models.mlp import RegularizedMLP
    from megatron_dataeff.ops.swiglu_dropout import dropout_keep_mask

    cfg = config_from_args(build_parser().parse_args(["--mlp-dropout", "0.5", "--num-layers", "1"]))
    cfg.validate_layout(1)
    model = build_model(cfg, 258, "cpu")
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, RegularizedMLP) and mlp.mlp_dropout == 0.5
    h = torch.randn(6, 2, 128)
    seen = {}
    mlp.linear_fc2.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    mlp.train()
    torch.manual_seed(3)
    out, _ = mlp(h)
    torch.manual_seed(3)
    key = int(torch.randint(0, 2**62, (1,)).item())
    inter, _ = mlp.linear_fc1(h)
    gate, up = torch.chunk(inter, 2, dim=-1)
    keep = dropout_keep_mask(12, 384, 0.5, key, 0x6D6C7064).reshape(6, 2, 384)
    expect = torch.nn.functional.silu(gate) * up * keep * 2.0
    assert torch.allclose(seen["x"], expect, atol=1e-5)
    assert 0.4 < keep.float().mean() < 0.6
    out.sum().backward()
    assert mlp.linear_fc1.weight.grad is not None
    mlp.eval()
    with torch.no_grad():
        assert torch.equal(mlp(h)[0], mlp(h)[0])


def test_mlp_dropout_refuses_a_spec_whose_mlp_is_not_megatrons(megatron_cpu):
    """A layer spec that builds some other MLP (a fused TE MLP, MoE) gets a clear error, not a silent no-op."""
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dataeff.models.layer_specs import _with_mlp_class
    from megatron_dataeff.models.mlp import RegularizedMLP

    class OtherMLP(torch.nn.Module):
        @classmethod
        def as_mlp_submodule(cls, **kwargs):
            return cls()

    for spec in (ModuleSpec(module=OtherMLP), functools.partial(OtherMLP.as_mlp_submodule, submodules=None)):
        with pytest.raises(NotImplementedError, match="--mlp-dropout.*RegularizedMLP"):
            _with_mlp_class(spec, RegularizedMLP)


# another valid value of each ModelConfig field (from the --num-layers 2 tiny model)
_OTHER_VALUE = {"num_layers": 1, "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 2,
                "num_query_groups": 4, "kv_channels": 16, "qk_layernorm": True, "seq_length": 64,
                "max_position_embeddings": 512, "rotary_base": 500000, "norm_epsilon": 1e-6, "init_method_std": 0.01,
                "untie_embeddings_and_output_weights": True, "make_vocab_size_divisible_by": 512,
                "hidden_dropout": 0.1, "attention_dropout": 0.1, "mlp_dropout": 0.1}


def test_weight_shape_fields_are_exactly_the_fields_that_change_the_weights(megatron_cpu):
    """A checkpoint is refused when a `weights=True` ModelConfig field differs (checkpointing.check_compatible):
    those must be exactly the fields whose change changes the model's parameter names or shapes, so a new
    shape field cannot escape the check (real megatron-core models, one per field)."""
    from dataclasses import fields, replace

    from megatron_dataeff.config import ModelConfig, weight_shape_fields

    def shapes(cfg):
        cfg.validate_layout(1)
        return {k: tuple(v.shape) for k, v in build_model(cfg, 258, "cpu").state_dict().items()
                if not k.endswith("_extra_state")}

    base = config_from_args(build_parser().parse_args(["--num-layers", "2", "--num-query-groups", "2"]))
    ref = shapes(base)
    assert set(_OTHER_VALUE) == {f.name for f in fields(ModelConfig)}, "give the new field another value above"
    changing = set()
    for name, value in _OTHER_VALUE.items():
        cfg = replace(base, model=replace(base.model, **{name: value}))
        if shapes(cfg) != ref:
            changing.add(name)
    assert changing == set(weight_shape_fields())


def test_dual_model_with_a_causal_row_mask_is_the_causal_model(megatron_cpu):
    """The dual objective's model attends both ways and gives AR rows a causal mask: with the same weights,
    a causal row equals the causal (AR) model and an unmasked row the bidirectional (mdm) one, in one batch."""
    from megatron_dataeff.objectives.row_masks import causal_rows

    def model_of(objective):
        cfg = config_from_args(build_parser().parse_args(["--objective", objective, "--num-layers", "2"]))
        cfg.validate_layout(1)
        return build_model(cfg, 258, "cpu").eval()

    dual, ar, mdm = model_of("dual"), model_of("ar"), model_of("mdm")
    ar.load_state_dict(dual.state_dict())
    mdm.load_state_dict(dual.state_dict())
    x = torch.randint(0, 258, (2, 12))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    mask = causal_rows(torch.tensor([True, False]), 12).dense()
    with torch.no_grad():
        mixed, causal, both = dual(x, pos, mask), ar(x, pos, None), mdm(x, pos, None)
    assert torch.allclose(mixed[0], causal[0], atol=1e-5) and torch.allclose(mixed[1], both[1], atol=1e-5)
    assert (causal[1] - both[1]).abs().max() > 1e-3  # the two views do differ
