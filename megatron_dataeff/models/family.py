"""The one model family built here: a dense GPT with RMSNorm, SwiGLU, RoPE and no biases (Llama / Qwen3).

`FACTS` is its one statement: each trait with, as it applies, the megatron-core TransformerConfig field and
its value, the GPTModel argument, the attribute of a Megatron-LM checkpoint's `args` and the value it must
have, Megatron-LM's flag and how `pretrain_diffusion.py` takes it, and one clause saying what is built.
Everything else is read from it:

* `FAMILY_OPTIONS`: the TransformerConfig values `models/builder.py` sets; `FAMILY_DEFAULTS`: megatron-core
  options it leaves at their defaults, which the family also relies on; `FAMILY_MODEL_ARGS`: GPTModel
  arguments.  The HF weight map (`export/hf_mapping.py`) represents exactly a model with all of them, and
  checks a model against them before it exports one.
* `megatron_lm_flags()`: the Megatron-LM flags the command line accepts, or refuses by name
  (`arguments.MEGATRON_DESCRIPTIVE`).
* `MEGATRON_LM_ARGS` / `megatron_lm_problems(args)`: the family's part of the Namespace written into a
  Megatron-LM checkpoint, and the check of one read (`checkpoint/megatron_lm.py`).

Torch is not imported: the command line reads the table, and tools/estimate_memory.py parses it without
torch (the one torch value, SwiGLU's activation function, is imported when `FAMILY_OPTIONS` is first read).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class Imported:
    """A value defined in a module the table must not import (torch): `module.name`, imported when read."""

    module: str
    name: str

    def resolve(self):
        return getattr(importlib.import_module(self.module), self.name)


@dataclass(frozen=True)
class Fact:
    """One trait of the family, with every name it goes by."""

    built: str
    """What is built here, one clause: a descriptive flag's help, the end of every refusal naming the trait."""
    config: Optional[tuple[str, Any]] = None
    """(megatron-core TransformerConfig field, its value here)."""
    set_by_builder: bool = False
    """`config` is set by the builder (FAMILY_OPTIONS); else it is megatron-core's default, relied on
    (FAMILY_DEFAULTS)."""
    gpt_model: Optional[tuple[str, Any]] = None
    """(megatron-core GPTModel argument, its value here)."""
    megatron_lm: Optional[tuple[str, Any]] = None
    """(attribute of Megatron-LM's args, the value it has for this family): written into the checkpoints
    Megatron-LM reads, and required of those read (when `checked`)."""
    flag: Optional[str] = None
    """Megatron-LM's flag that sets `megatron_lm`."""
    cli: Optional[Literal["on", "off", "value"]] = None
    """How pretrain_diffusion.py takes `flag`: a switch accepted (it asks for this family) or refused (it asks
    for something else), or a value accepted only when it is `megatron_lm`'s.  None: the flag is not taken."""
    checked: bool = True
    """A Megatron-LM checkpoint whose args have another value is refused (else the value is only written)."""
    also: Optional[str] = None
    """Another attribute some Namespaces state the trait under; its having the value is enough."""
    instead: Optional[str] = None
    """For a flag refused on the command line: what to do instead, after `built` in the refusal."""


SILU = Imported("torch.nn.functional", "silu")

FACTS = (
    Fact("norms are RMSNorm", config=("normalization", "RMSNorm"), set_by_builder=True,
         megatron_lm=("normalization", "RMSNorm"), flag="--normalization", cli="value"),
    Fact("norms are plain RMSNorm", megatron_lm=("apply_layernorm_1p", False), flag="--apply-layernorm-1p",
         cli="off", instead="drop the flag: the model computes the same function (layernorm-1p only stores "
                            "each norm weight as its offset from 1)"),
    Fact("norms are plain RMSNorm", config=("layernorm_zero_centered_gamma", False),
         megatron_lm=("layernorm_zero_centered_gamma", False), flag="--apply-layernorm-1p"),
    Fact("norms come before each sublayer (pre-norm residuals)",
         config=("apply_residual_connection_post_layernorm", False)),
    Fact("the MLP is SwiGLU", config=("gated_linear_unit", True), set_by_builder=True,
         megatron_lm=("swiglu", True), flag="--swiglu", cli="on", also="gated_linear_unit"),
    Fact("the MLP is SwiGLU", config=("activation_func", SILU), set_by_builder=True,
         megatron_lm=("squared_relu", False), flag="--squared-relu"),
    Fact("the MLP is dense (no mixture of experts)", config=("num_moe_experts", None),
         megatron_lm=("num_experts", None), flag="--num-experts"),
    Fact("linear layers have no biases", config=("add_bias_linear", False), set_by_builder=True,
         megatron_lm=("add_bias_linear", False), flag="--disable-bias-linear", cli="on"),
    Fact("the QKV projection has no bias", config=("add_qkv_bias", False), set_by_builder=True,
         megatron_lm=("add_qkv_bias", False), flag="--add-qkv-bias"),
    Fact("positions are RoPE", gpt_model=("position_embedding_type", "rope"),
         megatron_lm=("position_embedding_type", "rope"), flag="--position-embedding-type", cli="value"),
    Fact("no learned position embedding: RoPE", megatron_lm=("add_position_embedding", False),
         flag="--no-position-embedding", cli="on", checked=False),  # ignored by megatron-core's GPT with RoPE
    Fact("positions are RoPE", megatron_lm=("use_rotary_position_embeddings", True),
         flag="--use-rotary-position-embeddings", checked=False),  # Megatron-LM's older spelling
    Fact("RoPE covers the whole head dimension", gpt_model=("rotary_percent", 1.0),
         megatron_lm=("rotary_percent", 1.0), flag="--rotary-percent", cli="value"),
    Fact("RoPE rotates halves, not interleaved pairs", config=("rotary_interleaved", False),
         megatron_lm=("rotary_interleaved", False), flag="--rotary-interleaved"),
    Fact("RoPE is not rescaled (no Llama-3.1 scaling)", megatron_lm=("use_rope_scaling", False),
         flag="--use-rope-scaling"),
    Fact("attention is grouped-query attention", config=("multi_latent_attention", False),
         megatron_lm=("multi_latent_attention", False), flag="--multi-latent-attention"),
    Fact("attention scores are scaled by 1/sqrt(head dimension)", config=("softmax_scale", None)),
    Fact("attention scores are not scaled by the layer number", megatron_lm=("apply_query_key_layer_scaling", False),
         flag="--apply-query-key-layer-scaling", checked=False),  # for fp16; undone in the softmax
    Fact("every position attends to the whole sequence (no sliding window)", config=("window_size", None)),
    Fact("queries and keys are not L2-normalised", config=("qk_l2_norm", False)),
    Fact("the attention output is not gated", config=("attention_output_gate", False)),
    Fact("every layer is a transformer layer", megatron_lm=("is_hybrid_model", False),
         flag="--hybrid-override-pattern"),
)


def _resolved(value):
    return value.resolve() if isinstance(value, Imported) else value


# (fields absent in an older megatron-core are skipped where checked)
FAMILY_DEFAULTS = {f.config[0]: f.config[1] for f in FACTS if f.config and not f.set_by_builder}
FAMILY_MODEL_ARGS = {f.gpt_model[0]: f.gpt_model[1] for f in FACTS if f.gpt_model}
MEGATRON_LM_ARGS = {f.megatron_lm[0]: f.megatron_lm[1] for f in FACTS if f.megatron_lm}


def __getattr__(name: str):
    if name == "FAMILY_OPTIONS":  # built on first use: it holds torch's silu
        options = {f.config[0]: _resolved(f.config[1]) for f in FACTS if f.config and f.set_by_builder}
        globals()[name] = options
        return options
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def megatron_lm_flags() -> tuple[tuple[str, str, Optional[tuple], str], ...]:
    """(flag, "on" | "off" | "value", accepted values or None for a switch, what is built) of each Megatron-LM
    flag the command line takes for the family."""
    return tuple((f.flag, f.cli, (f.megatron_lm[1],) if f.cli == "value" else None,
                  f"{f.built}: {f.instead}" if f.instead else f.built)
                 for f in FACTS if f.cli)


def megatron_lm_problems(args) -> list[str]:
    """What in a Megatron-LM checkpoint's args (a Namespace, read by getattr; an attribute it lacks is taken to
    have the family's value) is not this family, one line each, naming Megatron-LM's flag."""
    problems = []
    for f in FACTS:
        if not (f.megatron_lm and f.checked):
            continue
        attr, required = f.megatron_lm
        value = getattr(args, attr, required)
        if value != required and f.also is not None:
            value = getattr(args, f.also, value)
        if value != required:
            problems.append(f"{f.flag} {value!r} in the checkpoint: here {f.built}")
    return problems
