"""Per-GPU memory of a run, from its configuration alone (no model is built, torch is not imported).

`estimate_memory(cfg, world_size, vocab_ids, device)` adds up, for the most loaded rank:

* persistent state: parameters (all in the parameter dtype, the RMSNorm weights included), megatron
  DDP's gradient buffer
  (fp32; bf16 for bf16 parameters with `--grad-reduce-in-bf16`) and the optimizer state (Adam's
  exp_avg / exp_avg_sq in fp32, plus an fp32 master copy of every bf16 parameter; divided over the
  data-parallel ranks with `--use-distributed-optimizer`);
* what the forward pass saves for backward: every layer of the stage times the micro-batches in flight
  (1F1B keeps up to PP - stage of them), the embedding's and the head's tensors, and on the last stage
  the logits the loss keeps;
* the largest transient at the moment of the peak: the start of backward (the loss gradient and its
  fp32 chunks), the output layer's weight gradient, a layer's backward or recomputation, or the
  optimizer step (when it outgrows the backward peak, as with a small micro-batch);
* stated allowances for what cannot be known from the config (CUDA context, cuBLAS workspaces, NCCL
  buffers, allocator fragmentation), kept apart from the estimate.

Every per-layer term is a named storage, the way autograd keeps it: a tensor saved by two operations,
or a view saved instead of its base (v is a view of the fused qkv output, so saving v keeps all of qkv),
counts once under one name.  On CPUs the counts are checked against what autograd really saves
(`tests/test_memory_estimate.py`, saved-tensor hooks over unique storages) and the total against a
training run's peak RSS.  The CUDA differences are read from the code paths that run there: torch's
fused RMSNorm (keeps x and rstd; the CPU composite also keeps x * rstd and an fp32 copy of x), megatron's fused SwiGLU
(keeps its input only), dropout masks as 1-byte booleans (the CPU path keeps a mask of the input's
dtype), flash / memory-efficient sdpa keeping q, k, v, the output and the log-sum-exp.
With transformer-engine (`impl te`) the layer is estimated as the local spec with flash attention.
Rows with their own attention masks (--reset-attention-mask, the dual and block objectives) under sdpa or
local attention carry a [b, 1, s, s] bool mask per micro-batch, and sdpa keeps a copy of it in the dtype
in every layer (FlexAttention keeps no [s, s] tensor).

Shapes: s = --seq-length, b = --micro-batch-size, h = hidden, F = ffn, t = TP; T = s * b tokens;
T' = T / t under sequence parallelism (the [s, b, h] parts), else T.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Sequence

from megatron_dataeff.config import RunConfig
from megatron_dataeff.models.attention_backends import attention_for_config
from megatron_dataeff.models.loss_choice import LossChoice, loss_for_config
from megatron_dataeff.models.shape import ModelShape
from megatron_dataeff.objectives import objective_class

GiB = 2**30
MiB = 2**20
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context + torch/cuBLAS/cuDNN kernels, outside torch's allocator
CUDA_WORKSPACE_BYTES = 128 * 2**20  # cuBLAS(Lt) workspaces of the streams in use
NCCL_BYTES = 1 * GiB  # NCCL communicator buffers (channels x peers x NCCL_BUFFSIZE) when world > 1
FRAGMENTATION = 0.10  # caching-allocator slack, as a fraction of activations + transients
CPU_RUNTIME_BYTES = 32 * MiB  # a CPU run's RSS beyond its tensors: library code and dataset pages faulted in,
# malloc arenas, gloo (measured 17-40 MiB over the tensors in the tests' runs, almost all of it file pages)
# What the driver reports for the cards sold as "80 GB" (H100 / A100) and "141 GB" (H200); other sizes
# are taken as GiB.  The CUDA context is inside these figures, hence the context allowance.
DEVICE_MIB = {80: 81559, 141: 143771}


def device_capacity(size_gb: float) -> int:
    """Bytes of a GPU sold as `size_gb` GB (as nvidia-smi reports it)."""
    mib = DEVICE_MIB.get(int(size_gb)) if float(size_gb).is_integer() else None
    return mib * MiB if mib else int(size_gb * GiB)


# ----------------------------------------------------------------------------------------------
# small helpers


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype, a name ("bf16", "float32", "torch.bfloat16") or a size."""
    if isinstance(dtype, int):
        return dtype
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).replace("torch.", "").lower()
    sizes = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4,
             "float": 4, "fp64": 8, "float64": 8, "double": 8}
    if name not in sizes:
        raise ValueError(f"unknown dtype {dtype!r}")
    return sizes[name]


def unfused_attention_bytes(micro_batch: int, heads_per_rank: int, seq: int, dtype, attention_dropout: float = 0.0,
                            *, device: str = "cuda") -> int:
    """Bytes of [b, heads, s, s] tensors megatron's DotProductAttention (`--attention-backend local`)
    keeps for backward, per layer and micro-batch: the softmax output in fp32 (its backward needs it;
    softmax runs in fp32), for a 16-bit dtype the probabilities cast back to it (the second bmm keeps
    them), and with attention dropout the mask (a 1-byte bool on CUDA, the dtype on CPU) and the dropped
    probabilities instead of the undropped ones."""
    e = dtype_bytes(dtype)
    n = micro_batch * heads_per_rank * seq * seq
    kept = 4 * n  # softmax output, fp32
    if attention_dropout > 0:
        kept += (1 if device == "cuda" else e) * n + e * n  # mask + dropped probabilities
    elif e != 4:
        kept += e * n  # probabilities in the dtype (fp32: the softmax output itself)
    return kept


# ----------------------------------------------------------------------------------------------
# shapes of one rank


@dataclass(frozen=True)
class _Shape:
    """What one rank computes: sizes per rank, dtype bytes and the kernels that will run."""

    s: int
    b: int
    model: ModelShape  # this rank's part of the model (`ModelShape.per_rank`)
    tp: int
    sp: bool
    e: int  # bytes of the parameter / activation dtype
    device: str
    impl: str  # sdpa | local | te
    kernel: str
    causal: bool
    p_attn: float
    p_hidden: float
    p_mlp: float
    mlp_fused_ext: bool  # the compiled SwiGLU+dropout kernel (else its torch reference)
    swiglu_fused: bool  # megatron's fused SwiGLU (GPU, --bias-swiglu-fusion on)
    dense_mask: bool = False  # rows with their own masks under sdpa / local: a [b, 1, s, s] bool mask a micro-batch

    # this rank's sizes, by the short names the formulas below use
    @property
    def h(self) -> int:
        """Hidden size."""
        return self.model.hidden_size

    @property
    def ffn(self) -> int:
        """F / t."""
        return self.model.ffn_hidden_size

    @property
    def nq(self) -> int:
        """Query heads / t."""
        return self.model.num_attention_heads

    @property
    def nkv(self) -> int:
        """Key/value groups / t (at least one)."""
        return self.model.num_query_groups

    @property
    def d(self) -> int:
        """Head dimension (--kv-channels)."""
        return self.model.head_dim

    @property
    def vocab(self) -> int:
        """Padded vocabulary / t."""
        return self.model.vocab_rows

    @property
    def qk_ln(self) -> bool:
        """Whether queries and keys are RMSNormed."""
        return self.model.qk_layernorm

    @property
    def tokens(self) -> int:
        return self.s * self.b

    @property
    def tokens_sp(self) -> int:
        """Rows of the [s, b, h] tensors on this rank."""
        return self.tokens // self.tp if self.sp else self.tokens

    @property
    def mask_bytes(self) -> int:
        """Bytes per element of a dropout mask."""
        return 1 if self.device == "cuda" else self.e

    @property
    def sdpa_path(self) -> str:
        """Which sdpa kernel runs: "flash" (keeps q, k, v as given), "efficient" (K/V repeated for GQA),
        or "math" (CPU with dropout: the scores are materialised, in fp32)."""
        if self.impl == "te":
            return "flash"
        if self.device == "cpu":
            return "math" if self.p_attn > 0 else "flash"
        if self.kernel in ("auto", "flash") and self.e == 2 and self.d <= 256 and not self.dense_mask:
            return "flash"  # (flash takes no mask)
        return "efficient"


def _shape(cfg: RunConfig, vocab_ids: int, device: str, te_available: bool) -> _Shape:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    choice = attention_for_config(cfg, device, te_available)
    objective = objective_class(cfg.objective)
    impl, kernel = choice.impl, choice.kernel
    if device == "cpu":
        fused_ext = importlib.util.find_spec("megatron_dataeff._C") is not None
    else:
        fused_ext = True  # built by `pip install -e .` where nvcc exists (csrc/README.md)
    return _Shape(
        s=m.seq_length * objective.sequence_multiple(cfg.objective),
        b=cfg.optim.micro_batch_size * objective.rows_per_sample(cfg.objective),
        model=ModelShape.from_model_config(m, m.vocab_rows(vocab_ids)).per_rank(tp), tp=tp,
        sp=bool(p.sequence_parallel and tp > 1), e=2 if cfg.optim.bf16 else 4, device=device, impl=impl,
        kernel=kernel, causal=not objective.bidirectional, p_attn=m.attention_dropout,
        p_hidden=m.hidden_dropout, p_mlp=m.mlp_dropout, mlp_fused_ext=fused_ext,
        swiglu_fused=device == "cuda" and cfg.compute.bias_swiglu_fusion,
        dense_mask=(objective.row_attention_masks or cfg.data.reset_attention_mask) and impl in ("sdpa", "local"),
    )


class _Saved(dict):
    """Storages kept for backward, by name: naming one twice (two ops saving it) counts it once."""

    def keep(self, name: str, nbytes: int) -> None:
        self.setdefault(name, int(nbytes))


def _norm(saved: _Saved, sh: _Shape, name: str, x: str, x_bytes: int, elements: int, rows: int) -> None:
    """What RMSNorm `name` over `x` (a storage of x_bytes; `elements` of it normalised, in `rows` rows)
    keeps.

    On CUDA torch's fused kernel (weight and input share a dtype: our norms are in the parameter dtype)
    and transformer-engine's norms keep x and rstd (fp32).  torch's composite (CPUs) keeps x upcast to
    fp32 (x itself when it is fp32), rstd, and x * rstd in fp32 for the weight's gradient."""
    if sh.device == "cuda" or sh.impl == "te":
        saved.keep(x, x_bytes)
        saved.keep(f"{name}.rstd", 4 * rows)
        return
    if sh.e == 4:
        saved.keep(x, x_bytes)
    else:
        saved.keep(f"{name}.fp32", 4 * elements)
    saved.keep(f"{name}.rstd", 4 * rows)
    saved.keep(f"{name}.normed", 4 * elements)


def _core_attention(saved: _Saved, sh: _Shape, q: str, k: str, qkv_bytes: int) -> str:
    """What core attention keeps of q [T, nq, d] (storage q), k [T, nkv, d] (storage k) and v (a view of
    the qkv storage); returns the name of its output storage (the input linear_proj keeps)."""
    T, e = sh.tokens, sh.e
    dq = T * sh.model.q_rows
    gqa = sh.nq != sh.nkv
    bnss = sh.b * sh.nq * sh.s * sh.s
    if sh.impl == "local":
        # repeat_interleave for GQA makes new K/V; baddbmm keeps q and k, the second bmm v
        saved.keep(q, e * dq)
        saved.keep("k.repeated" if gqa else k, e * dq)
        saved.keep("v.repeated" if gqa else "qkv", e * dq if gqa else qkv_bytes)
        if sh.causal and not sh.dense_mask:  # (a row mask is the micro-batch's one tensor: `edge`)
            saved.keep("causal_mask", sh.s * sh.s)  # masked_fill's [s, s] bool, built per call
        saved.keep("attention.probs", unfused_attention_bytes(sh.b, sh.nq, sh.s, e, sh.p_attn, device=sh.device))
        saved.keep("context", e * dq)  # bmm -> permute().contiguous()
        return "context"
    path = sh.sdpa_path
    if path == "math":  # CPU with dropout: q * scale, k, v in fp32 (K/V repeated), scores, mask, dropped
        saved.keep("math.q", 4 * dq)
        saved.keep("math.k", 4 * dq)
        if gqa or e != 4:
            saved.keep("math.v", 4 * dq)
        else:
            saved.keep("qkv", qkv_bytes)
        saved.keep("math.probs", 3 * 4 * bnss)  # softmax output, dropout noise (fp32), dropped probs
        saved.keep("context", e * dq)  # the output, cast back to the dtype
        return "context"
    if path == "efficient" and gqa:  # no native GQA there: K/V repeated to every head
        saved.keep(q, e * dq)
        saved.keep("k.repeated", e * dq)
        saved.keep("v.repeated", e * dq)
    else:
        saved.keep(q, e * dq)
        saved.keep(k, e * T * sh.model.kv_rows)
        saved.keep("qkv", qkv_bytes)
    if sh.dense_mask:  # each call turns the bool mask into one of the dtype ([b, 1, s, s]) and keeps it
        saved.keep("attention.mask", e * sh.b * sh.s * sh.s)
    s_lse = math.ceil(sh.s / 32) * 32 if path == "efficient" else sh.s
    saved.keep("attention.lse", 4 * sh.b * sh.nq * s_lse)
    saved.keep("attention.out", e * dq)  # linear_proj's input is a view of it
    return "attention.out"


def layer_activations(sh: _Shape, recompute_modules: Sequence[str] = ()) -> dict[str, int]:
    """Bytes one transformer layer keeps for backward for one micro-batch, by storage (the layer's
    input included; its output is the next layer's input).  `recompute_modules`: selective
    recomputation (core_attn, mlp, layernorm)."""
    saved = _Saved()
    T, Ts, h, e, d = sh.tokens, sh.tokens_sp, sh.h, sh.e, sh.d
    dq, dkv = sh.model.q_rows, sh.model.kv_rows
    qkv_bytes = e * T * sh.model.qkv_rows
    recompute_norm = "layernorm" in recompute_modules
    # input RMSNorm, then linear_qkv keeps its (un-gathered, under SP) input
    _norm(saved, sh, "ln1", "x", e * Ts * h, Ts * h, Ts)
    if not recompute_norm:  # CheckpointWithoutOutput drops the norm output and recomputes it
        saved.keep("ln1.out", e * Ts * h)
    # q is a copy when the qkv split cannot be a view (several groups of several heads); k, v are views
    q_copy = sh.nkv > 1 and sh.nq // sh.nkv > 1
    q_store, q_bytes = ("q", e * T * dq) if q_copy else ("qkv", qkv_bytes)
    if sh.qk_ln:
        _norm(saved, sh, "q_ln", q_store, q_bytes, T * dq, T * sh.nq)
        _norm(saved, sh, "k_ln", "qkv", qkv_bytes, T * dkv, T * sh.nkv)
    # RoPE keeps cos and sin ([s, 1, 1, d], the dtype) for q and for k; its outputs are new tensors
    if sh.impl != "te":
        saved.keep("rope.cos_sin", 4 * e * sh.s * d)
    if "core_attn" in recompute_modules:  # checkpoint keeps the inputs: q, k after RoPE, v (a qkv view)
        saved.keep("attn_mask_type", 4)  # and the mask type, as an int32 tensor
        saved.keep("q.rope", e * T * dq)
        saved.keep("k.rope", e * T * dkv)
        saved.keep("qkv", qkv_bytes)
        out = "context"
        saved.keep(out, e * T * dq)
    else:
        out = _core_attention(saved, sh, "q.rope", "k.rope", qkv_bytes)
    saved.keep(out, e * T * dq)  # linear_proj's input
    if sh.p_hidden > 0:
        saved.keep("bda1.mask", sh.mask_bytes * Ts * h)
    _norm(saved, sh, "ln2", "r1", e * Ts * h, Ts * h, Ts)  # pre-MLP RMSNorm of the residual
    if "mlp" in recompute_modules:  # checkpoint keeps the MLP input only (the norm output)
        saved.keep("ln2.out", e * Ts * h)
    else:
        if not recompute_norm:
            saved.keep("ln2.out", e * Ts * h)
        F = sh.ffn
        saved.keep("fc1.out", e * T * 2 * F)  # [T, 2F/t]: SwiGLU keeps it (its halves are views)
        if (sh.p_mlp == 0 and not sh.swiglu_fused) or (sh.p_mlp > 0 and not sh.mlp_fused_ext):
            # megatron's unfused glu: silu(a) * (b + 0): keeps silu(a) and the (b + 0) copy
            saved.keep("swiglu.silu", e * T * F)
            saved.keep("swiglu.up", e * T * F)
            if sh.p_mlp > 0:  # the torch reference's dropout: its mask in the dtype and the product
                saved.keep("swiglu.mask", e * T * F)
                saved.keep("swiglu.product", e * T * F)
        saved.keep("fc2.in", e * T * F)  # linear_fc2's input (the fused op's output)
    if sh.p_hidden > 0:
        saved.keep("bda2.mask", sh.mask_bytes * Ts * h)
    return dict(saved)


def _scores_backward_peak(sh: _Shape) -> int:
    """Bytes per [b, heads, s, s] element that materialised attention's backward holds beyond what the
    layer saved, at its largest.  Walked op by op in reverse, each op allocating its input gradient
    before its saved tensors and incoming gradient are released: bmm (probabilities' gradient; then the
    dropped or cast probabilities go), dropout (gradient times mask; then mask and gradient go), the cast
    of the fp32 softmax to the dtype (an fp32 gradient), softmax (its input gradient; then the fp32
    output goes), the causal masked_fill_ (a new gradient; in fp32 the scores it filled are a view of
    the baddbmm output, so autograd's CopySlices adds a strided copy and a clone).  CPU math sdpa keeps
    its scores in fp32 and masks without an in-place view."""
    local = sh.impl == "local"
    e = sh.e if local else 4
    dropout = sh.p_attn > 0
    mask = (1 if sh.device == "cuda" else e) if dropout else 0
    steps = [((e,), e if (dropout or e != 4) else 0)]  # bmm: grad of probs; frees the probs it saved
    if dropout:
        steps.append(((e,), mask + e))  # grad * mask; frees the mask and the incoming grad
    if e != 4:
        steps.append(((4,), e))  # cast back to fp32; frees the dtype grad
    steps.append(((4,), 8))  # softmax backward; frees the fp32 output and the incoming grad
    if local and sh.causal:
        steps.append(((4, 4, 4) if e == 4 else (4,), 4))  # masked_fill_ (CopySlices when a view)
    live = peak = 0
    for allocs, freed in steps:
        for n in allocs:
            live += n
            peak = max(peak, live)
        live -= freed
    return peak


_AFTER_ATTENTION = ("context", "bda1.mask", "r1", "ln2.", "fc1.out", "swiglu.", "fc2.in", "bda2.mask")
_MLP = ("fc1.out", "swiglu.", "fc2.in")


def _part(saved: dict, prefixes: tuple) -> int:
    return sum(v for k, v in saved.items() if k.startswith(prefixes))


def layer_backward_transient(sh: _Shape, recompute_modules: Sequence[str] = ()) -> int:
    """Bytes one layer's backward holds beyond what the layer saved, at its largest: the larger of

    * the MLP's backward: its recomputed internals under selective `mlp`, then the gradients of the
      [T, 2F] / [T, F] tensors and of fc1's weight;
    * the attention's backward: its recomputed internals under selective `core_attn`, the gradients of
      q, k, v, and for materialised attention (local, CPU math sdpa) the [b, heads, s, s] gradients
      (`_scores_backward_peak`); by then the MLP's and the residual's saved tensors are freed."""
    full, kept = layer_activations(sh), layer_activations(sh, recompute_modules)
    T, e = sh.tokens, sh.e
    mlp = _part(full, _MLP) - _part(kept, _MLP) + e * T * 3 * sh.ffn + e * sh.model.mlp_parameters
    after = _part(kept, _AFTER_ATTENTION)
    recomputed = (sum(full.values()) - _part(full, _AFTER_ATTENTION)) - (sum(kept.values()) - after)
    attn = recomputed + e * T * sh.model.qkv_rows * 2 - after
    if sh.impl == "local" or (sh.impl == "sdpa" and sh.sdpa_path == "math"):
        attn += _scores_backward_peak(sh) * sh.b * sh.nq * sh.s * sh.s
    return max(mlp, attn, 0)


# ----------------------------------------------------------------------------------------------
# parameters, gradients, optimizer


def parameter_counts(cfg: RunConfig, vocab_ids: int, stage: int = 0) -> tuple[int, int]:
    """(matrix parameters, RMSNorm weights) on one TP rank of pipeline `stage`, all in the parameter
    dtype.  The last stage holds the output layer: untied, or tied with
    PP > 1 (a copy of the word embeddings, kept in sync by megatron's embedding group)."""
    m, p = cfg.model, cfg.parallel
    pp = p.pipeline_model_parallel_size
    shape = ModelShape.from_model_config(m, m.vocab_rows(vocab_ids)).per_rank(p.tensor_model_parallel_size)
    layers = m.num_layers // pp
    matrices = layers * shape.layer_matrix_parameters
    norms = layers * shape.layer_norm_parameters
    first, last = stage == 0, stage == pp - 1
    if first:
        matrices += shape.embedding_parameters
    if last:
        norms += shape.final_norm_parameters
        if not shape.tied or not first:
            matrices += shape.embedding_parameters
    return matrices, norms


@dataclass
class MemoryEstimate:
    """Bytes on one rank of pipeline stage `stage` (every TP and DP rank of a stage is alike)."""

    stage: int
    num_stages: int
    parameters: int
    gradients: int
    optimizer_state: int
    buffers: int  # megatron's global memory buffer (local attention's baddbmm input, SP all-gathers)
    activations: int  # saved for backward at the start of backward, all micro-batches in flight
    loss: int  # what the loss keeps (logits, their statistics); last stage only
    transient: int  # the largest allocation beyond the saved tensors during backward
    optimizer_step: int  # what the optimizer step allocates (the activations are gone by then)
    peak_moment: str  # where the peak is: "loss backward", "output layer backward", "optimizer step", ...
    allowances: dict = field(default_factory=dict)  # stated, not estimated: context, workspaces, ...
    num_parameters: int = 0
    micro_batches_in_flight: int = 1
    layers: int = 0
    per_layer: dict = field(default_factory=dict)  # one layer, one micro-batch, by storage
    notes: list = field(default_factory=list)

    @property
    def persistent(self) -> int:
        """Parameters + gradient buffer + optimizer state + megatron's buffers: held for the whole run."""
        return self.parameters + self.gradients + self.optimizer_state + self.buffers

    @property
    def backward_peak(self) -> int:
        """Bytes beyond the persistent state at the largest moment of the forward-backward pass."""
        return self.activations + self.loss + self.transient

    @property
    def total(self) -> int:
        """The estimated peak of allocated bytes (without the allowances)."""
        return self.persistent + max(self.backward_peak, self.optimizer_step)

    @property
    def total_with_allowances(self) -> int:
        """The peak a device must hold: the estimate plus the stated allowances."""
        return self.total + sum(self.allowances.values())

    def fits(self, sizes_gb: Sequence[float] = (80, 141)) -> dict[float, bool]:
        """For each device size (GB as the card is sold, `device_capacity`): does the peak with the
        allowances fit?"""
        return {float(g): self.total_with_allowances <= device_capacity(g) for g in sizes_gb}


def _persistent(cfg: RunConfig, vocab_ids: int, stage: int, dp: int) -> tuple[int, int, int, int, int]:
    """(parameters, gradients, optimizer state, parameter count, largest tensor's elements)."""
    mats, norms = parameter_counts(cfg, vocab_ids, stage)
    e = 2 if cfg.optim.bf16 else 4
    params = e * (mats + norms)
    # megatron DDP: one contiguous gradient buffer, fp32 unless bf16 reduction
    grad_e = 2 if (cfg.optim.bf16 and cfg.parallel.grad_reduce_in_bf16) else 4
    grads = grad_e * (mats + norms)
    # Adam exp_avg + exp_avg_sq (fp32) for every parameter, plus fp32 masters of the bf16 ones
    opt = (8 + (4 if cfg.optim.bf16 else 0)) * (mats + norms)
    if cfg.parallel.use_distributed_optimizer:
        opt = math.ceil(opt / dp)
    shape = ModelShape.from_model_config(cfg.model, cfg.model.vocab_rows(vocab_ids)).per_rank(
        cfg.parallel.tensor_model_parallel_size)
    largest = max(shape.embedding_parameters, 2 * shape.ffn_hidden_size * shape.hidden_size)  # embedding or fc1
    return params, grads, opt, mats + norms, largest


def _optimizer_step_transient(cfg: RunConfig, device: str, te_available: bool, count: int, largest: int,
                              dp: int) -> int:
    """Bytes the optimizer step allocates: torch's AdamW (megatron's fallback without TE / apex) runs
    per tensor on CPUs (sqrt(v) and its quotient: two fp32 copies of the largest tensor) and as
    foreach on CUDA (one fp32 copy of all the parameters it steps); TE's / apex's FusedAdam works in
    place.  bf16 gradients (`--grad-reduce-in-bf16`) are cast to fp32 for the step."""
    shard = math.ceil(count / dp) if cfg.parallel.use_distributed_optimizer else count
    if device == "cpu":
        step = 8 * largest
    elif te_available:
        step = 0
    else:
        step = 4 * shard
    if cfg.optim.bf16 and cfg.parallel.grad_reduce_in_bf16:
        step += 4 * shard
    return step


# ----------------------------------------------------------------------------------------------
# the stage as a whole


def _head(sh: _Shape) -> int:
    """The final RMSNorm and the output layer's (un-gathered) input."""
    saved = _Saved()
    _norm(saved, sh, "final_ln", "y", sh.e * sh.tokens_sp * sh.h, sh.tokens_sp * sh.h, sh.tokens_sp)
    saved.keep("final_ln.out", sh.e * sh.tokens_sp * sh.h)
    return sum(saved.values())


def _loss_terms(cfg: RunConfig, sh: _Shape, loss: LossChoice) -> tuple[int, int, int]:
    """(kept by the loss, its backward's transient, alive beyond the activations during the output
    layer's backward).

    Chunked (models/cross_entropy.py): the logits [T, V/t] in the dtype plus per token the max and sum
    of exponentials (fp32), the local target (int64) and the outside-the-shard flag (bool); the
    backward writes the gradient over the logits, one chunk at a time through an fp32 softmax of the
    chunk (two in bf16: the upcast and the shifted copy).  Unchunked (`--cross-entropy-chunk-size 0`,
    or megatron's fused loss): an fp32 softmax of the logits' size (in fp32 the logits themselves,
    updated in place) plus the target mask and int64 targets; in bf16 its gradient becomes a bf16 copy.
    Then the output layer's backward holds the logits' gradient, its weight gradient [V/t, h] in the
    dtype (before it is added into the fp32 grad buffer) and the input gradient [T, h].  Fused with the output
    layer (Cut Cross-Entropy): no logits and no logits' gradient; the log-sum-exp and the targets are kept, and
    its blocks of logits inside the kernels are not counted."""
    T, V, e = sh.tokens, sh.vocab, sh.e
    wgrad_and_dgrad = e * V * sh.h + e * T * sh.h
    if loss.linear:  # Cut Cross-Entropy: no logits; it keeps the log-sum-exp (fp32) and the int64 targets
        return 12 * T, 0, wgrad_and_dgrad
    if not loss.chunked:
        kept = 4 * T * V + 9 * T
        grad = 4 * T * V if (e == 4 and not loss.fused) else 2 * T * V
        bwd = 0 if grad == kept - 9 * T else grad  # a bf16 gradient is a new tensor next to the softmax
        return kept, bwd, grad + wgrad_and_dgrad
    tokens = min(T, loss.chunk_tokens)
    kept = e * T * V + 17 * T
    bwd = (1 if e == 4 else 2) * 4 * tokens * V
    return kept, bwd, e * T * V + wgrad_and_dgrad


def _stage_estimate(cfg: RunConfig, vocab_ids: int, stage: int, dp: int, device: str, te_available: bool,
                    world_size: int, capacity_bytes: int) -> MemoryEstimate:
    m, p, c = cfg.model, cfg.parallel, cfg.compute
    pp = p.pipeline_model_parallel_size
    sh = _shape(cfg, vocab_ids, device, te_available)
    first, last = stage == 0, stage == pp - 1
    layers = m.num_layers // pp
    in_flight = min(pp - stage, cfg.num_microbatches(dp))
    notes = []

    selective = list(c.recompute_modules or ["core_attn"]) if c.recompute_granularity == "selective" else []
    full_layer = layer_activations(sh)
    per_layer = layer_activations(sh, selective)
    a_full, a = sum(full_layer.values()), sum(per_layer.values())
    x_in = sh.e * sh.tokens_sp * sh.h  # a layer's input, what full recomputation checkpoints
    rotary = 4 * sh.s * sh.d  # the [s, 1, 1, d] fp32 RoPE table, an argument of every checkpoint
    bwd_layer = layer_backward_transient(sh)  # a fully recomputed layer's backward

    # one micro-batch's saved tensors on this stage (without the loss's)
    edge = 0
    if sh.dense_mask:  # the micro-batch's [b, 1, s, s] bool mask, which every layer reads (local keeps it)
        edge += sh.b * sh.s * sh.s
    if first:
        edge += 8 * sh.tokens  # the token ids the embedding's backward needs
        if sh.p_hidden > 0:
            edge += sh.mask_bytes * sh.tokens_sp * sh.h  # embedding dropout
    if last:
        edge += _head(sh)
    candidates = {}
    if c.recompute_granularity == "full":
        k = min(c.recompute_num_layers, layers)
        if c.recompute_method == "uniform":
            one = math.ceil(layers / k) * x_in + rotary + edge
            candidates["recompute backward"] = in_flight * one + k * a_full + bwd_layer
        else:  # block: the first k layers checkpointed, the rest keep everything
            one = k * x_in + (layers - k) * a_full + rotary + edge
            candidates["recompute backward"] = (in_flight - 1) * one + k * x_in + rotary + edge + a_full + bwd_layer
            if layers > k:
                candidates["layer backward"] = in_flight * one + bwd_layer
    else:
        one = layers * a + edge
        candidates["layer backward"] = in_flight * one + layer_backward_transient(sh, selective)
    activations = in_flight * one

    loss = 0
    if last:
        kept, loss_bwd, out_bwd = _loss_terms(cfg, sh, loss_for_config(cfg, vocab_ids, capacity_bytes, device))
        loss = kept
        candidates["loss backward"] = activations + kept + loss_bwd
        candidates["output layer backward"] = activations + out_bwd
    if first:
        candidates["embedding backward"] = (in_flight - 1) * one + sh.e * sh.vocab * sh.h
    moment = max(candidates, key=candidates.get)
    transient = candidates[moment] - activations - loss

    params, grads, opt, count, largest = _persistent(cfg, vocab_ids, stage, dp)
    step = _optimizer_step_transient(cfg, device, te_available, count, largest, dp)
    if step > candidates[moment]:
        moment = "optimizer step"

    # megatron's global memory buffer ("mpu"): local attention's baddbmm input [b * heads, s, s] and the
    # sequence-parallel all-gathers [s, b, h] share one buffer per dtype.  On CPUs the baddbmm input is
    # never written (beta = 0), so its pages stay out of RSS.
    buffers = 0
    if sh.impl == "local" and device == "cuda":
        buffers = sh.e * sh.b * sh.nq * sh.s * sh.s
    if sh.sp:
        buffers = max(buffers, sh.e * sh.tokens * sh.h)

    allowances = {}
    if device == "cuda":
        allowances["cuda context"] = CUDA_CONTEXT_BYTES
        allowances["cuBLAS workspaces"] = CUDA_WORKSPACE_BYTES
        if world_size > 1:
            allowances["NCCL buffers"] = NCCL_BYTES
        allowances["allocator fragmentation"] = int(FRAGMENTATION * (activations + loss + max(transient, 0)))
    else:
        allowances["process runtime (code and data pages, malloc)"] = CPU_RUNTIME_BYTES
    if sh.impl == "te":
        notes.append("transformer-engine layers are estimated as the local spec with flash attention")
    if sh.sdpa_path == "math" and sh.impl == "sdpa":
        notes.append("sdpa with attention dropout on CPUs runs the math kernel: [b, heads, s, s] in fp32")
    if sh.impl == "local" and device == "cuda":
        notes.append("local attention: assumes megatron's compiled masked-softmax kernels are absent (as "
                     "without apex), so the fp32 softmax is kept")
    return MemoryEstimate(
        stage=stage, num_stages=pp, parameters=params, gradients=grads, optimizer_state=opt, buffers=buffers,
        activations=activations, loss=loss, transient=transient, optimizer_step=step, peak_moment=moment,
        allowances=allowances, num_parameters=count, micro_batches_in_flight=in_flight, layers=layers,
        per_layer=per_layer, notes=notes,
    )


def default_capacity(device: str) -> int:
    """The memory an estimate assumes when not told (it decides the automatic loss, models/loss_choice.py):
    an 80 GB GPU, or this machine's memory per process."""
    if device == "cuda":
        return device_capacity(80)
    from megatron_dataeff.platform import host_memory_bytes  # deferred: torch is imported only for CPU estimates

    return host_memory_bytes()


def estimate_stages(cfg: RunConfig, world_size: int, vocab_ids: int, device: str = "cuda",
                    te_available: bool = False, capacity_bytes: int | None = None) -> list[MemoryEstimate]:
    """One estimate per pipeline stage (a rank of each; TP and DP ranks of a stage are alike).

    `vocab_ids`: ids the model embeds (the tokenizer's, mask token included, before padding);
    `te_available`: whether transformer-engine will be importable where it runs (CUDA only);
    `capacity_bytes`: the device's memory, which the automatic loss choice reads (default: `default_capacity`)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    cfg = copy.deepcopy(cfg)
    dp = cfg.validate_layout(world_size)
    te = te_available and device == "cuda"
    capacity = default_capacity(device) if capacity_bytes is None else capacity_bytes
    return [_stage_estimate(cfg, vocab_ids, stage, dp, device, te, world_size, capacity)
            for stage in range(cfg.parallel.pipeline_model_parallel_size)]


def estimate_memory(cfg: RunConfig, world_size: int, vocab_ids: int, device: str = "cuda",
                    te_available: bool = False, capacity_bytes: int | None = None) -> MemoryEstimate:
    """The estimate of the most loaded rank: the pipeline stage with the largest peak (with PP > 1
    usually the first, which holds PP micro-batches in flight, or the last, which holds the logits)."""
    return max(estimate_stages(cfg, world_size, vocab_ids, device, te_available, capacity_bytes),
               key=lambda est: est.total_with_allowances)


def startup_report(cfg: RunConfig, world_size: int, vocab_ids: int, capacity_bytes: int,
                   te_available: bool = False) -> list[str]:
    """The trainer's start-up lines on a GPU: the estimated peak against this device's memory, and for
    megatron's unfused attention at sequence >= 2048 what its [b, heads, s, s] tensors will take."""
    est = estimate_memory(cfg, world_size, vocab_ids, "cuda", te_available, capacity_bytes)
    need = est.total_with_allowances
    lines = [f"[megatron_dataeff] memory estimate per GPU: {need / GiB:.1f} GiB with allowances "
             f"({est.total / GiB:.1f} GiB of tensors; peak at {est.peak_moment}, pipeline stage {est.stage}) of "
             f"{capacity_bytes / GiB:.1f} GiB on this device"
             + ("" if need <= capacity_bytes else " -- it will likely run out of memory; see tools/estimate_memory.py")]
    choice = attention_for_config(cfg, "cuda", te_available)
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    if choice.impl == "local" and m.seq_length >= 2048:
        per_layer = unfused_attention_bytes(cfg.optim.micro_batch_size, m.num_attention_heads // tp, m.seq_length,
                                            "bf16" if cfg.optim.bf16 else "fp32", m.attention_dropout)
        layers = m.num_layers // cfg.parallel.pipeline_model_parallel_size
        lines.append(f"[megatron_dataeff] attention local (unfused) at seq {m.seq_length}: its [batch, heads, seq, "
                     f"seq] tensors keep {per_layer / GiB:.2f} GiB per layer per micro-batch of {cfg.optim.micro_batch_size} "
                     f"for backward, "
                     f"{per_layer * layers * est.micro_batches_in_flight / GiB:.1f} GiB for this stage's {layers} "
                     f"layers; --attention-backend sdpa keeps none of them")
    return lines
