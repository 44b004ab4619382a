"""Build megatron-core GPT models (one per pipeline stage) from a RunConfig.

`DataEffTransformerConfig` subclasses megatron's TransformerConfig to carry `mlp_dropout` and the
loss chunking; the rest maps onto megatron's own fields (RMSNorm, SwiGLU, RoPE, no biases,
recomputation, sequence parallelism, fusions).  `DataEffGPTModel` is megatron's GPTModel whose loss is
megatron's own or the chunked vocab-parallel cross entropy (`models.cross_entropy`), as `models.loss_choice`
picks for the run and the memory at hand.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dataeff import platform
from megatron_dataeff.config import ConfigError, RunConfig
from megatron_dataeff.models.attention_backends import AttentionChoice, attention_for_config
from megatron_dataeff.models.cross_entropy import (chunked_vocab_parallel_cross_entropy, linear_cross_entropy,
                                                   linear_cross_entropy_available)
from megatron_dataeff.models.family import FAMILY_MODEL_ARGS, FAMILY_OPTIONS
from megatron_dataeff.models.loss_choice import LossChoice, loss_for_config
from megatron_dataeff.models.layer_specs import build_block_spec, build_layer_spec, transformer_engine_available
from megatron_dataeff.objectives import objective_class


@dataclass
class DataEffTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the regularisers and loss options it does not have."""

    mlp_dropout: float = 0.0
    """Dropout probability on the MLP's inner activation (input of linear_fc2)."""

    cross_entropy_chunk_size: Optional[int] = None
    """Tokens per chunk of the chunked loss; 0 = megatron-core's unchunked loss (build_model sets it from
    models.loss_choice; None = the chunked loss, chunks of automatic size)."""

    reset_position_ids: bool = False
    """The rotary embedding takes each token's position id (restarting after each EOD: --reset-position-ids);
    False: positions 0..seq-1, megatron-core's rotary embedding, which ignores position ids."""


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def per_token_positions(cfg: RunConfig) -> bool:
    """Whether the rotary embedding takes each token's position id: restarting after each EOD
    (--reset-position-ids), or an objective's own (block diffusion's positions repeated on both halves)."""
    return cfg.data.reset_position_ids or objective_class(cfg.objective).token_positions


def gpu_fusions(cfg: RunConfig, use_te: bool) -> dict[str, bool]:
    """TransformerConfig fusion fields on a GPU: each on when asked for (the default) and its kernel
    exists without apex (SwiGLU and dropout-add use megatron's torch.compile fuser; the masked softmax
    needs megatron's compiled softmax kernels; fused RoPE and weight-gradient accumulation need TE)."""
    c = cfg.compute
    return dict(
        bias_activation_fusion=c.bias_swiglu_fusion,
        bias_dropout_fusion=c.bias_dropout_fusion,
        # megatron's fused causal softmax applies its own triangle and ignores a document mask
        masked_softmax_fusion=c.masked_softmax_fusion and _importable("scaled_upper_triang_masked_softmax_cuda")
        and _importable("scaled_masked_softmax_cuda") and not cfg.data.reset_attention_mask,
        # transformer-engine's fused RoPE takes one table for the batch, not positions per token
        apply_rope_fusion=c.rope_fusion and use_te and not per_token_positions(cfg),
        gradient_accumulation_fusion=c.gradient_accumulation_fusion
        and (use_te or _importable("fused_weight_gradient_mlp_cuda")),
        persist_layer_norm=False,  # apex's persistent LayerNorm; our norm is RMSNorm
    )


def attention_choice(cfg: RunConfig, device: str) -> AttentionChoice:
    """What `--attention-backend` means for this run on `device`."""
    return attention_for_config(cfg, device, transformer_engine_available())


# Run-config fields that share a TransformerConfig field's name but are not copied: the builder derives them
# (--attention-backend is resolved to megatron's AttnBackend by the attention choice; the layer spec, not
# megatron's `transformer_impl`, decides between transformer-engine and local modules).
NOT_COPIED = ("attention_backend", "transformer_impl")


def transformer_config_fields(cfg: RunConfig) -> dict:
    """{field: value} of the run config's model / parallel / compute / optim fields named as a TransformerConfig
    field is (as Megatron-LM's core_transformer_config_from_args matches its args), except `NOT_COPIED`; a None
    leaves megatron-core's default."""
    names = {f.name for f in dataclasses.fields(DataEffTransformerConfig)}
    return {f.name: getattr(section, f.name)
            for section in (cfg.model, cfg.parallel, cfg.compute, cfg.optim) for f in dataclasses.fields(section)
            if f.name in names and f.name not in NOT_COPIED and getattr(section, f.name) is not None}


def transformer_config(cfg: RunConfig, device: str, initialize: bool = True) -> DataEffTransformerConfig:
    """The megatron TransformerConfig of a run (`initialize` False: weights left uninitialised, for a model whose
    every weight is about to be loaded)."""
    m, c = cfg.model, cfg.compute
    dtype = torch.bfloat16 if cfg.optim.bf16 else torch.float32
    choice = attention_choice(cfg, device)
    if c.cross_entropy_loss_fusion and c.cross_entropy_fusion_impl == "te" and choice.impl != "te":
        raise ConfigError("--cross-entropy-fusion-impl te needs transformer-engine on a GPU")
    if c.recompute_modules and "layernorm" in c.recompute_modules and not transformer_engine_available():
        # megatron-core's CheckpointWithoutOutput reads transformer-engine's FP8 state unconditionally
        # (0.16.1 to 0.19.2: NameError without TE)
        raise ConfigError("--recompute-modules layernorm needs transformer-engine (megatron-core's norm "
                          "recomputation uses it); use core_attn and/or mlp")
    kwargs = {
        **transformer_config_fields(cfg),
        **FAMILY_OPTIONS,
        "layernorm_epsilon": m.norm_epsilon,
        "pipeline_dtype": dtype,
        "params_dtype": dtype,
        "calculate_per_token_loss": True,  # losses are (sum, count): exact under any micro-batch split
        "deallocate_pipeline_outputs": True,
        "attention_backend": AttnBackend[choice.kernel] if choice.impl == "te" else AttnBackend.local,
        "perform_initialization": initialize,
        # per-token rotary positions: restarting after each EOD, or an objective's own (block diffusion's
        # repeated positions)
        "reset_position_ids": per_token_positions(cfg),
    }
    if c.cross_entropy_fusion_impl == "cce":  # ours (the model fuses the output layer with the loss), not megatron's
        kwargs.update(cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native")
    if device == "cpu":
        kwargs.update(platform.cpu_config_overrides())
    else:
        kwargs.update(gpu_fusions(cfg, use_te=choice.impl == "te"), use_cpu_initialization=c.use_cpu_initialization)
    with warnings.catch_warnings():
        # megatron-core 0.19 warns that its own default cuda_graph_modules ("full") is deprecated: no flag sets it
        warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning,
                                module=r"megatron\.core\.transformer\.transformer_config")
        return DataEffTransformerConfig(**kwargs)


@functools.cache
def _quiet_gpt_model_notice() -> None:
    """megatron-core 0.19 logs at every GPTModel built that GPTModel is deprecated in favour of its HybridModel: a
    notice to us, who build on GPTModel, that no user can act on."""
    logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(
        lambda record: not record.getMessage().startswith("GPTModel IS DEPRECATED"))


class DataEffGPTModel(GPTModel):
    """megatron-core's GPTModel with the chunked vocab-parallel loss (same values, no fp32 logits kept)."""

    attention_choice: Optional[AttentionChoice] = None  # set by build_model: which attention and why
    loss_choice: Optional[LossChoice] = None  # set by build_model: which cross entropy and why

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        """megatron-core's preprocessing; with --reset-position-ids the rotary embedding is taken at each token's
        position id ([seq, batch, 1, dim] instead of megatron's [seq, 1, 1, dim] table, which ignores them)."""
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        # (decoder_input, rotary_pos_emb, ...) in every supported megatron-core version
        # a config built elsewhere (megatron's own TransformerConfig) takes megatron's positions
        if not getattr(self.config, "reset_position_ids", False) or position_ids is None or out[1] is None:
            return out
        # the table of every position the model takes (--max-position-embeddings), cached by megatron
        table = self.rotary_pos_emb(max(out[1].shape[0], self.max_sequence_length))
        per_token = table[:, 0, 0][position_ids.transpose(0, 1).to(table.device)]  # [s, b, dim]
        return (out[0], per_token.unsqueeze(2), *out[2:])

    def forward(self, *args, labels=None, **kwargs):
        # with a fused linear loss the output layer hands the loss its input and weight instead of logits
        layer = self.output_layer if self.post_process else None
        defer = isinstance(layer, _DeferredLogitsLayer) and labels is not None
        if defer:
            layer.defer = True
        try:
            return super().forward(*args, labels=labels, **kwargs)
        finally:
            if defer:
                layer.defer = False

    def compute_language_model_loss(self, labels, logits):
        if isinstance(logits, _DeferredLogits):
            return linear_cross_entropy(logits.hidden, logits.weight, labels)
        chunk = getattr(self.config, "cross_entropy_chunk_size", 0)  # build_model's LossChoice
        if self.config.cross_entropy_loss_fusion or chunk == 0:
            return super().compute_language_model_loss(labels, logits)
        pg = getattr(self, "pg_collection", None)
        group = pg.tp if pg is not None else parallel_state.get_tensor_model_parallel_group()
        # [b, s] -> [s, b], the logits' layout
        loss = chunked_vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), chunk, group)
        return loss.transpose(0, 1).contiguous()


@dataclass
class _DeferredLogits:
    """What the output layer hands the loss under a fused linear loss: its input [s, b, h] and weight [V, h]."""

    hidden: torch.Tensor
    weight: torch.Tensor


class _DeferredLogitsLayer:
    """Mixed into the output layer's own class (its parameters and checkpoint keys unchanged): while `defer` is
    set (a forward with labels), it returns its input and weight for `compute_language_model_loss` to fuse with
    the loss; otherwise (generation, evaluation of logits) it computes logits as always."""

    defer = False

    def forward(self, input_, weight=None, *args, **kwargs):
        if not self.defer:
            return super().forward(input_, weight, *args, **kwargs)
        return _DeferredLogits(input_, self.weight if weight is None else weight), None


@functools.cache
def _output_layer_class(base: type) -> type:
    return type(f"DeferredLogits{base.__name__}", (_DeferredLogitsLayer, base), {})


def build_model(
    cfg: RunConfig, vocab_ids: int, device: str, *, pre_process=None, post_process=None, initialize: bool = True
) -> DataEffGPTModel:
    """This pipeline stage's GPTModel (parallel state must be initialised).

    `model.attention_choice` records which attention implementation was built and why.  `initialize` False
    skips the random initialisation (time, and on CPUs a full-size master copy per weight) for a model whose
    weights are all loaded next."""
    tcfg = transformer_config(cfg, device, initialize)
    loss = loss_for_config(cfg, vocab_ids, platform.memory_at_hand(device), device)
    if loss.linear and not linear_cross_entropy_available():
        raise ConfigError("--cross-entropy-fusion-impl cce needs Cut Cross-Entropy: pip install cut-cross-entropy "
                          "(or leave the loss to auto)")
    tcfg.cross_entropy_chunk_size = loss.chunk_tokens
    choice = attention_choice(cfg, device)
    spec = build_layer_spec(bidirectional=objective_class(cfg.objective).bidirectional,
                            qk_layernorm=cfg.model.qk_layernorm, mlp_dropout=cfg.model.mlp_dropout, attention=choice)
    spec = build_block_spec(spec, tcfg, choice)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    _quiet_gpt_model_notice()
    model = DataEffGPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.model.vocab_rows(vocab_ids),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        **FAMILY_MODEL_ARGS,
        rotary_base=cfg.model.rotary_base,
    )
    model.attention_choice, model.loss_choice = choice, loss
    if loss.linear and post_process:
        model.output_layer.__class__ = _output_layer_class(type(model.output_layer))
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for p in model.parameters())
