"""Layer specs for our GPT models: megatron-core's own specs, adjusted the way specs are meant to be.

* attention direction: masked diffusion attends both ways.  megatron-core has no config flag for
  that; the self-attention submodule's `attn_mask_type` param decides (`no_mask` vs `causal`), and
  the model is then called with `attention_mask=None`.
* MLP dropout: dropout on the MLP's inner activation (the input of `linear_fc2`).  The spec's MLP
  module becomes `models.mlp.RegularizedMLP`, which fuses SwiGLU and dropout.  Up to megatron-core
  0.17 the MLP submodule is a `ModuleSpec`; from 0.18 it is `partial(MLP.as_mlp_submodule, ...)`,
  a classmethod that builds its own class, so the partial is rebuilt on our class's classmethod.
* transformer-engine's spec is used on GPUs when TE is importable; otherwise the local spec.
"""

from __future__ import annotations

import copy
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec


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


def build_layer_spec(
    *, bidirectional: bool, qk_layernorm: bool, mlp_dropout: float, use_transformer_engine: bool
) -> ModuleSpec:
    """The transformer-layer spec of a dense GPT model with RMSNorm and SwiGLU."""
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    attention.params = dict(attention.params or {})
    attention.params["attn_mask_type"] = AttnMaskType.no_mask if bidirectional else AttnMaskType.causal
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

