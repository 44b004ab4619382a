"""`--attention-backend`: which attention implementation a run gets, and why (no torch import, so that
the memory estimate and the command line can use it).

`--attention-backend` takes Megatron-LM's values plus `sdpa`:

| value   | GPU with transformer-engine      | GPU without TE                        | CPU                          |
|---------|----------------------------------|---------------------------------------|------------------------------|
| auto    | TE's spec, TE picks the kernel   | sdpa, torch picks (flash, efficient)  | sdpa (flash kernel; math with dropout) |
| flash   | TE's FlashAttention              | sdpa restricted to FlashAttention     | sdpa's CPU flash kernel (no dropout) |
| fused   | TE's cuDNN fused attention       | sdpa restricted to cuDNN / efficient  | refused (no such CPU kernel) |
| unfused | TE's unfused attention           | megatron's DotProductAttention        | megatron's DotProductAttention |
| local   | megatron's DotProductAttention   | megatron's DotProductAttention        | megatron's DotProductAttention |
| sdpa    | sdpa, torch picks                | sdpa, torch picks                     | sdpa                          |
| flex    | FlexAttention (compiled)         | FlexAttention (compiled)              | FlexAttention (our backward)  |

Attention beyond causal or full (rows with their own masks: --reset-attention-mask's documents, the dual
objective's per-sample masks, block diffusion's blocks) takes a backend that takes a mask per row:

- documents under one causality for every row (ar, token dropout, MIR, mdm): on a GPU with transformer-engine and
  --bf16, `auto` (and flash / fused / unfused) take transformer-engine's packed sequences (THD: each document a sequence
  of its own, models/packed_sequences.py);
- otherwise `auto` means FlexAttention on a GPU and sdpa on CPUs; sdpa, flex and local take every mask;
  transformer-engine's kernels are refused by name where they cannot apply (a causality per row, blocks, no
  transformer-engine, CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dataeff.config import ATTENTION_BACKENDS, ConfigError
from megatron_dataeff.objectives import objective_class


@dataclass(frozen=True)
class AttentionChoice:
    """What `--attention-backend` resolved to on this machine."""

    requested: str  # the flag's value
    impl: str  # "te" (transformer-engine's spec) | "sdpa" (SDPAttention in the local spec) | "local"
    kernel: str  # te: auto | flash | fused | unfused; sdpa: auto | flash | fused; local: unfused
    reason: str  # why, for the start-up line
    # the forward packs a micro-batch's documents into one stream of sequences (megatron's `thd` format,
    # models/packed_sequences.py) instead of handing the attention a mask
    packed: bool = False

    def describe(self) -> str:
        """One phrase for the start-up line."""
        name = {"te": f"transformer-engine ({self.kernel})", "local": "megatron local (unfused)", "flex": "flex",
                "sdpa": "sdpa" + ("" if self.kernel == "auto" else f" ({self.kernel} kernel)")}[self.impl]
        return f"attention {name}{', packed sequences (THD)' if self.packed else ''}: {self.reason}"


def resolve_attention_backend(requested: str, device: str, te_available: bool,
                              attention_dropout: float = 0.0, transformer_impl: str = "transformer_engine"
                              ) -> AttentionChoice:
    """The implementation `--attention-backend requested` means on `device` (see the module table);
    `--transformer-impl local` never takes transformer-engine."""
    gpu_te = device == "cuda" and te_available and transformer_impl != "local"
    if device != "cuda":
        no_te = "on CPUs"
    elif transformer_impl == "local":
        no_te = "--transformer-impl local"
    else:
        no_te = "transformer-engine is not importable"
    if requested == "auto":
        if gpu_te:
            return AttentionChoice(requested, "te", "auto", "auto: transformer-engine is importable on a GPU")
        return AttentionChoice(requested, "sdpa", "auto", f"auto: {no_te}")
    if requested in ("flash", "fused", "unfused") and gpu_te:
        return AttentionChoice(requested, "te", requested, f"--attention-backend {requested}")
    if requested == "flash":
        if device == "cpu" and attention_dropout > 0:
            raise ConfigError("--attention-backend flash: the CPU flash kernel has no dropout; with "
                              "--attention-dropout use --attention-backend sdpa (or local)")
        return AttentionChoice(requested, "sdpa", "flash", f"--attention-backend flash, {no_te}")
    if requested == "fused":
        if device != "cuda":
            raise ConfigError("--attention-backend fused needs a GPU (cuDNN / memory-efficient attention); "
                              "on CPUs use auto, sdpa, flash or local")
        return AttentionChoice(requested, "sdpa", "fused", f"--attention-backend fused, {no_te}")
    if requested in ("unfused", "local"):
        why = f"--attention-backend {requested}" + (f", {no_te}" if requested == "unfused" else "")
        return AttentionChoice(requested, "local", "unfused", why)
    if requested == "sdpa":
        return AttentionChoice(requested, "sdpa", "auto", "--attention-backend sdpa")
    if requested == "flex":
        if attention_dropout > 0:
            raise ConfigError("--attention-backend flex has no attention dropout; with --attention-dropout use "
                              "sdpa (or local)")
        return AttentionChoice(requested, "flex", "auto", "--attention-backend flex")
    raise ConfigError(f"--attention-backend {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")


def attention_for_config(cfg, device: str, te_available: bool) -> AttentionChoice:
    """What a RunConfig's --attention-backend / --transformer-impl mean on `device` (trainer and memory
    estimate alike).  Rows that carry their own attention masks (--reset-attention-mask's documents, the dual
    objective's per-sample masks, block diffusion's blocks) need an attention that takes them (module docstring):
    transformer-engine's packed sequences for documents under one causality on a GPU, else FlexAttention on a
    GPU and sdpa on CPUs (what `auto` means), sdpa, flex or local; other choices are refused by name."""
    requested = cfg.compute.attention_backend
    per_row = objective_class(cfg.objective).row_attention_masks
    if per_row:
        why = f"--objective {cfg.objective.name} gives each sample its own attention mask (causal or none)"
    elif cfg.data.reset_attention_mask:
        why = "--reset-attention-mask confines attention to each packed document"
    else:
        return resolve_attention_backend(requested, device, te_available, cfg.model.attention_dropout,
                                         cfg.compute.transformer_impl)
    gpu_te = device == "cuda" and te_available and cfg.compute.transformer_impl != "local"
    # transformer-engine's variable-length kernels (flash, cuDNN) take bf16; its unfused attention has no THD
    if requested in ("auto", "flash", "fused", "unfused") and gpu_te and not per_row and cfg.optim.bf16:
        return AttentionChoice(requested, "te", requested, f"{requested}: {why} (transformer-engine's packed "
                               f"sequences on a GPU: a sequence per document)", packed=True)
    if requested == "auto" and device == "cuda" and cfg.model.attention_dropout == 0:
        return AttentionChoice(requested, "flex", "auto", f"auto: {why} (FlexAttention's block masks on a GPU)")
    if requested in ("auto", "sdpa"):
        return AttentionChoice(requested, "sdpa", "auto", f"{requested}: {why}")
    if requested == "flex":
        return resolve_attention_backend(requested, device, te_available, cfg.model.attention_dropout)
    if requested == "local" or (requested == "unfused" and not gpu_te):
        return AttentionChoice(requested, "local", "unfused", f"--attention-backend {requested}: {why}")
    if per_row:
        raise ConfigError(f"{why}, which --attention-backend {requested} does not take (transformer-engine's "
                          f"packed sequences are a mask type for all rows): use auto, sdpa, flex or local")
    where = "on CPUs" if device != "cuda" else "--transformer-impl local" \
        if cfg.compute.transformer_impl == "local" else "transformer-engine is not importable" if not te_available \
        else "without --bf16"
    raise ConfigError(f"{why}, which --attention-backend {requested} takes as transformer-engine's packed sequences "
                      f"(THD), and those need transformer-engine on a GPU in bf16 ({where}): use auto, sdpa, flex "
                      f"or local")
