"""The one model family built here: a dense GPT with RMSNorm, SwiGLU, RoPE and no biases (Llama / Qwen3).

`FAMILY_OPTIONS` are the TransformerConfig values `models/builder.py` always sets; `FAMILY_DEFAULTS`
are megatron-core options it leaves at their defaults, which the family also relies on.  The HF weight
map (`export/hf_mapping.py`) represents exactly a model with all of them, and checks a model against
both before it exports or imports one.
"""

from __future__ import annotations

import torch.nn.functional as F

FAMILY_OPTIONS = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "activation_func": F.silu,  # with the gate: SwiGLU
    "add_bias_linear": False,
    "add_qkv_bias": False,
}

FAMILY_DEFAULTS = {  # (fields absent in an older megatron-core are skipped where checked)
    "layernorm_zero_centered_gamma": False,
    "rotary_interleaved": False,
    "apply_residual_connection_post_layernorm": False,
    "num_moe_experts": None,
    "multi_latent_attention": False,
    "softmax_scale": None,
    "window_size": None,
    "qk_l2_norm": False,
    "attention_output_gate": False,
}
