"""Layer specs for our GPT models: megatron-core's own specs, adjusted the way specs are meant to be.

* attention direction: masked diffusion attends both ways.  megatron-core has no config flag for
  that; the self-attention submodule's `attn_mask_type` param decides (`no_mask` vs `causal`), and
  the model is then called with `attention_mask=None`.
* MLP dropout: dropout on the MLP's inner activation (the input of `linear_fc2`).  The spec's MLP
  module becomes `models.mlp.RegularizedMLP`, which fuses SwiGLU and dropout.  Up to megatron-core
  0.17 the MLP submodule is a `ModuleSpec`; from 0.18 it is `partial(MLP.as_mlp_submodule, ...)`,
  a classmethod that builds its own class, so the partial is rebuilt on our class's classmethod.
* attention kernel (`--attention-backend`, resolved by `models.attention`): transformer-engine's
  spec; megatron's local spec with our `SDPAttention` as its core attention; or the local spec as it
  is (megatron's unfused `DotProductAttention`).  sdpa and local name their parameters alike, so
  their checkpoints are interchangeable.
* norms (local spec): `RMSNorm`, torch's RMSNorm marked for sequence parallelism.  megatron-core's
  local spec wraps torch's norm in `WrappedTorchNorm`, which refuses `--sequence-parallel` (apex's
  fused norm is the only local norm megatron supports there); under sequence parallelism each TP rank
  normalises its slice of the sequence, so the weight's gradient is a partial sum that megatron's
  `finalize_model_grads` all-reduces over the TP group for every parameter marked `sequence_parallel`.
  The block's final norm comes from `build_block_spec`, which names this norm too.
"""

from __future__ import annotations

import copy
import functools

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_dataeff.models.attention import SDPAttention
from megatron_dataeff.models.attention_backends import AttentionChoice


@functools.cache
def transformer_engine_available() -> bool:
    """True when transformer-engine imports (it needs CUDA)."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: F401
            get_gpt_layer_with_transformer_engine_spec,
        )
    except Exception:  # ImportError, or TE's own CUDA checks failing
        return False
    return True


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron's norm constructor, its weight marked `sequence_parallel` and in the
    parameter dtype, like every other weight (Megatron-LM's Float16Module casts the norms too): torch
    fuses the norm only when weight and input share a dtype, and its unfused form keeps fp32 copies of
    the normalised tensor for backward."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("zero-centred RMSNorm weights are not supported")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def build_block_spec(layer_spec: ModuleSpec, config, attention: AttentionChoice):
    """The decoder-block spec of a stage: `layer_spec` repeated, then the final norm (ours with the
    local spec; megatron's choice, TE's norm, with transformer-engine)."""
    if attention.impl == "te":
        return layer_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm)


def build_layer_spec(
    *, bidirectional: bool, qk_layernorm: bool, mlp_dropout: float, attention: AttentionChoice
) -> ModuleSpec:
    """The transformer-layer spec of a dense GPT model with RMSNorm and SwiGLU."""
    if attention.impl == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    if attention.impl != "te":
        layer = spec.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
        attn = layer.self_attention.submodules
        if qk_layernorm:
            attn.q_layernorm = attn.k_layernorm = RMSNorm
    if attention.impl == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = functools.partial(
            SDPAttention, kernel=attention.kernel)
    elif attention.impl == "flex":
        from megatron_dataeff.models.flex_attention import FlexAttention

        spec.submodules.self_attention.submodules.core_attention = FlexAttention
    self_attention = spec.submodules.self_attention
    self_attention.params = dict(self_attention.params or {})
    self_attention.params["attn_mask_type"] = AttnMaskType.no_mask if bidirectional else AttnMaskType.causal
    if mlp_dropout > 0:
        from megatron_dataeff.models.mlp import RegularizedMLP

        spec.submodules.mlp = _with_mlp_class(spec.submodules.mlp, RegularizedMLP)
    return spec


def _with_mlp_class(mlp, cls):
    """The MLP submodule spec `mlp` building `cls` (a subclass of megatron's MLP) instead of MLP."""
    from megatron.core.transformer.mlp import MLP

    if isinstance(mlp, ModuleSpec) and mlp.module is MLP:  # megatron-core <= 0.17
        mlp.module = cls
        return mlp
    func = getattr(mlp, "func", None)
    if (isinstance(mlp, functools.partial) and getattr(func, "__self__", None) is MLP
            and getattr(func, "__name__", "") == "as_mlp_submodule"):  # megatron-core >= 0.18
        return functools.partial(cls.as_mlp_submodule, *mlp.args, **mlp.keywords)
    raise NotImplementedError(
        f"--mlp-dropout: this megatron-core's layer spec builds its MLP as {mlp!r}, not megatron's MLP; "
        f"cannot put {cls.__name__} in its place")

