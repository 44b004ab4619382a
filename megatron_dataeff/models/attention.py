"""Our sdpa core attention, a drop-in for megatron-core's DotProductAttention.

Which implementation `--attention-backend` picks is `models.attention_backends` (torch-free).

`SDPAttention` is a drop-in for megatron-core's `DotProductAttention` in the local layer spec (same
constructor and forward contract, no parameters, so checkpoints are interchangeable with the local
spec).  It calls `torch.nn.functional.scaled_dot_product_attention`, which keeps q, k, v, the output
and the log-sum-exp for backward instead of the [batch, heads, seq, seq] probabilities, and skips the
masked half of causal attention.  Grouped-query attention is passed to the kernel with `enable_gqa`
where the kernel takes it (CPU flash, CUDA flash in fp16/bf16); elsewhere K/V are repeated as
megatron's own attention does.

Attention dropout: the kernel draws its mask from the torch generator, inside megatron's
model-parallel RNG fork exactly where `DotProductAttention` draws its own (outside it under sequence
parallelism).  The probability, where it applies (the attention probabilities, scaled by 1/(1-p))
and its RNG stream are the same for every backend, so `auto` never changes what `--attention-dropout`
means; but no backend keys it per sample: attention-dropout draws differ between TP layouts and
micro-batch splits (as in Megatron-LM), unlike token dropout, the mdm noise and MLP dropout.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

_TORCH_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


_KERNELS = {"flash": ("FLASH_ATTENTION",), "fused": ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION")}


def _kernel_context(kernel: str):
    """torch's sdpa restricted to the named kernels (`auto`: torch chooses)."""
    if kernel == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, name) for name in _KERNELS[kernel] if hasattr(SDPBackend, name)]
    return sdpa_kernel(backends)


def check_core_attention_config(config, backend: str) -> None:
    """Refuse what a drop-in core attention of ours (sdpa, flex) does not implement: context parallelism,
    sliding windows, softmax variants."""
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError(f"the {backend} attention backend does not support context parallelism")
    if getattr(config, "window_size", None) is not None:
        raise ValueError(f"the {backend} attention backend does not support sliding-window attention")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise ValueError(f"the {backend} attention backend supports softmax_type vanilla, not {config.softmax_type}")


class SDPAttention(MegatronModule):
    """megatron-core core attention on `torch.nn.functional.scaled_dot_product_attention`.

    query [sq, b, heads/tp, d], key / value [sk, b, groups/tp, d] -> context [sq, b, heads/tp * d].
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type=None, pg_collection=None, kernel: str = "auto"):
        super().__init__(config=config)
        check_core_attention_config(config, "sdpa")
        if kernel not in ("auto", "flash", "fused"):
            raise ValueError(f"sdpa kernel must be auto, flash or fused, got {kernel!r}")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.kernel = kernel
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = max(1, config.num_query_groups // tp)
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides then multiplies by the layer number in megatron's
        # softmax (an fp16 overflow guard): the product is the plain scale.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def _native_gqa(self, query: torch.Tensor) -> bool:
        """Whether the kernel torch will pick takes grouped K/V as they are (no repeat)."""
        if not _TORCH_HAS_GQA:
            return False
        if query.device.type == "cpu":
            return True
        # CUDA: FlashAttention takes GQA (fp16/bf16, head dim <= 256); the efficient and cuDNN
        # kernels do not, and torch would fall back to the math kernel, which materialises the scores.
        return self.kernel in ("auto", "flash") and query.dtype in (torch.float16, torch.bfloat16) \
            and self.head_dim <= 256

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise NotImplementedError("the sdpa attention backend does not take an attention bias")
        if packed_seq_params is not None:  # megatron's `thd` layout: [t, heads, d], one stream of sequences (models/packed_sequences.py)
            if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
                raise NotImplementedError("the sdpa attention backend takes packed sequences in the thd format, "
                                          "without a mask")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            attention_mask = _sequence_mask(packed_seq_params, query.shape[0], key.shape[0])
        sq, b, heads, d = query.shape
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d]: views; the kernels take these strides.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = k.shape[1]
        gqa = heads != groups
        if gqa and not self._native_gqa(query):
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
            gqa = False
        mask, causal = None, False
        # Like megatron's attention, the spec's mask type decides (a one-token decode step attends to
        # every cached position; a longer query is aligned to the end of the keys).
        if self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk and attention_mask is None:
                causal = True
            else:
                offset = sk - sq
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=offset)
        if attention_mask is not None:  # megatron's convention: True = masked out
            keep = ~attention_mask.to(torch.bool)
            mask = keep if mask is None else (keep & mask)
        dropout = self.dropout_p if self.training else 0.0
        extra = {"enable_gqa": True} if gqa else {}
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng, _kernel_context(self.kernel):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     scale=self.softmax_scale, **extra)
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """No parameters, nothing to checkpoint (as megatron's vanilla-softmax DotProductAttention)."""
        return {}


def _sequence_mask(params, sq: int, sk: int) -> torch.Tensor:
    """[1, 1, sq, sk] bool, True = masked out: keys outside the query's sequence of a packed stream (cu_seqlens).
    The dense form of what variable-length kernels do, so that the packed path runs (and is tested) on CPUs."""
    def sequence(cu, n):
        return torch.searchsorted(cu[1:].to(torch.int64), torch.arange(n, device=cu.device), right=True)

    q = sequence(params.cu_seqlens_q, sq)
    k = sequence(params.cu_seqlens_kv, sk)
    return (q[:, None] != k[None, :])[None, None]
