"""Build megatron-core GPT models (one per pipeline stage) from a RunConfig.

`DataEffTransformerConfig` subclasses megatron's TransformerConfig to carry `mlp_dropout`; the
rest of the shape maps onto megatron's own fields (RMSNorm, SwiGLU, RoPE, no biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dataeff import platform
from megatron_dataeff.config import RunConfig, padded_vocab_size
from megatron_dataeff.models.layer_specs import build_layer_spec, transformer_engine_available


@dataclass
class DataEffTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the regularisers it does not have."""

    mlp_dropout: float = 0.0
    """Dropout probability on the MLP's inner activation (input of linear_fc2)."""


def transformer_config(cfg: RunConfig, device: str) -> DataEffTransformerConfig:
    """The megatron TransformerConfig of a run."""
    m, p = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if cfg.optim.bf16 else torch.float32
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        qk_layernorm=m.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        mlp_dropout=m.mlp_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=cfg.optim.bf16,
        calculate_per_token_loss=True,  # losses are (sum, count): exact under any micro-batch split
        deallocate_pipeline_outputs=True,
    )
    if device == "cpu":
        kwargs.update(platform.cpu_config_overrides())
    else:
        kwargs.update(bias_activation_fusion=False, apply_rope_fusion=False,
                      gradient_accumulation_fusion=False)
    return DataEffTransformerConfig(**kwargs)


def model_vocab_size(cfg: RunConfig, num_ids: int) -> int:
    """Rows of the embedding: the ids in use (mask token included), padded."""
    return padded_vocab_size(num_ids, cfg.model.make_vocab_size_divisible_by)


def build_model(
    cfg: RunConfig, num_ids: int, device: str, *, pre_process=None, post_process=None
) -> GPTModel:
    """This pipeline stage's GPTModel (parallel state must be initialised)."""
    tcfg = transformer_config(cfg, device)
    use_te = device == "cuda" and transformer_engine_available()
    spec = build_layer_spec(bidirectional=cfg.objective.bidirectional, qk_layernorm=cfg.model.qk_layernorm,
                            mlp_dropout=cfg.model.mlp_dropout, use_transformer_engine=use_te)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=model_vocab_size(cfg, num_ids),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for p in model.parameters())
