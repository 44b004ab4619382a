"""Layer specs for our GPT models: megatron-core's own specs, adjusted the way specs are meant to be.

* attention direction: masked diffusion attends both ways.  megatron-core has no config flag for
  that; the self-attention submodule's `attn_mask_type` param decides (`no_mask` vs `causal`), and
  the model is then called with `attention_mask=None`.
* MLP dropout: dropout on the MLP's inner activation, i.e. on the input of `linear_fc2`.  The spec's
  `linear_fc2` class is replaced by a subclass that applies it (`with_input_dropout`).  The inner
  activation is split over tensor-parallel ranks, so its dropout draws from megatron's
  model-parallel RNG stream, like attention dropout does.
* transformer-engine's spec is used on GPUs when TE is importable; otherwise the local spec.
"""

from __future__ import annotations

import copy
import functools

import torch
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


@functools.cache
def with_input_dropout(base_cls: type) -> type:
    """A subclass of a row-parallel linear layer that applies `config.mlp_dropout` to its input."""

    class InputDropoutLinear(base_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            config = kwargs.get("config", args[2] if len(args) > 2 else None)
            self.input_dropout = float(getattr(config, "mlp_dropout", 0.0))

        def forward(self, input_, *args, **kwargs):
            if self.training and self.input_dropout > 0:
                from megatron.core.tensor_parallel import get_cuda_rng_tracker

                # The input is this rank's shard of the inner activation: a model-parallel region.
                with get_cuda_rng_tracker().fork():
                    input_ = torch.nn.functional.dropout(input_, p=self.input_dropout, training=True)
            return super().forward(input_, *args, **kwargs)

    InputDropoutLinear.__name__ = f"InputDropout{base_cls.__name__}"
    InputDropoutLinear.__qualname__ = InputDropoutLinear.__name__
    return InputDropoutLinear


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
        mlp = spec.submodules.mlp.submodules
        mlp.linear_fc2 = with_input_dropout(mlp.linear_fc2)
    return spec


def is_bidirectional(spec: ModuleSpec) -> bool:
    """Whether a layer spec attends both ways."""
    return spec.submodules.self_attention.params.get("attn_mask_type") == AttnMaskType.no_mask
