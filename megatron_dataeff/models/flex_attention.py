"""`--attention-backend flex`: core attention on torch's FlexAttention with block masks.

`FlexAttention` is a drop-in for megatron-core's `DotProductAttention` in the local layer spec, like
`SDPAttention` (same constructor and forward contract, no parameters: checkpoints are interchangeable).  Its
attention mask is a `torch.nn.attention.flex_attention.BlockMask` (the trainer builds one per micro-batch from
the objective's `RowMask`, shared by every layer), or a dense `[batch, 1, sq, sk]` bool mask (True = masked out,
megatron's convention; turned into a block mask), or None: the layer spec's causal or full attention.  Blocks
that are wholly masked are skipped, and no `[seq, seq]` tensor is kept for backward (q, k, v, the output and
the log-sum-exp are).

On CUDA the kernel is torch.compile'd FlexAttention, forward and backward.  torch (2.13) has no FlexAttention
backward on CPUs, so there the forward is torch's and the backward ours (`_CPUFlexAttention`): the
FlashAttention recurrence from the saved log-sum-exp, over chunks of queries, so it too keeps no `[seq, seq]`
tensor beyond one chunk's.  No dropout: `--attention-dropout` with flex is refused (attention_backends).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_dataeff.models.attention import check_core_attention_config

# Query rows per chunk of the CPU backward: chunk x keys x heads x batch fp32 scores at a time.
_CPU_BACKWARD_ELEMENTS = 1 << 24


def _causal(b, h, q, kv):
    return kv <= q


def block_mask_of(mask: torch.Tensor | None, causal: bool, batch: int, sq: int, sk: int, device) -> BlockMask | None:
    """A BlockMask of a dense `[batch, 1, sq, sk]` bool mask (True = masked out) or, for None, of the causal
    mask (None when not causal: full attention)."""
    if mask is None:
        return _causal_block_mask(sq, sk, str(device)) if causal else None
    keep = ~mask.to(torch.bool)
    if causal:
        keep = keep & torch.ones(sq, sk, dtype=torch.bool, device=keep.device).tril(sk - sq)
    rows = keep.shape[0]

    def dense(b, h, q, kv):
        return keep[b if rows > 1 else 0, 0, q, kv]

    return create_block_mask(dense, batch if rows > 1 else None, None, sq, sk, device=device)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(sq: int, sk: int, device: str) -> BlockMask:
    offset = sk - sq

    def causal(b, h, q, kv):
        return kv <= q + offset

    return create_block_mask(causal, None, None, sq, sk, device=device)


def _mask_rows(block_mask: BlockMask | None, batch: int, q0: int, q1: int, sk: int, device) -> torch.Tensor | None:
    """[batch or 1, 1, q1 - q0, sk] bool, True = attended, of queries q0..q1 (None: every key)."""
    if block_mask is None:
        return None
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = torch.arange(q0, q1, device=device)[None, None, :, None]
    kv = torch.arange(sk, device=device)[None, None, None, :]
    return block_mask.mask_mod(b, h, q, kv)


def _eager_flex(*args, **kwargs):
    """torch's FlexAttention uncompiled (the CPU path: its forward materialises one layer's scores for the
    moment, keeping none), without torch's advice to compile it, which is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


class _CPUFlexAttention(torch.autograd.Function):
    """torch's FlexAttention forward on CPU with a chunked recompute backward (torch has none on CPUs)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, scale, gqa):
        out, lse = _eager_flex(q.detach(), k.detach(), v.detach(), block_mask=block_mask, scale=scale,
                               enable_gqa=gqa, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.scale = block_mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        b, n, sq, d = q.shape
        groups, sk = k.shape[1], k.shape[2]
        if groups != n:
            k = k.repeat_interleave(n // groups, dim=1)
            v = v.repeat_interleave(n // groups, dim=1)
        qf, kf, vf = q.float(), k.float(), v.float()
        do, of = grad_out.float(), out.float()
        dq = torch.zeros_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        delta = (do * of).sum(-1, keepdim=True)  # [b, n, sq, 1]
        chunk = max(1, _CPU_BACKWARD_ELEMENTS // max(1, b * n * sk))
        for q0 in range(0, sq, chunk):
            q1 = min(sq, q0 + chunk)
            scores = torch.matmul(qf[:, :, q0:q1], kf.transpose(-1, -2)) * ctx.scale
            p = torch.exp(scores - lse[:, :, q0:q1, None].float())
            keep = _mask_rows(ctx.block_mask, b, q0, q1, sk, q.device)
            if keep is not None:
                p = torch.where(keep, p, torch.zeros((), dtype=p.dtype))
            dv += torch.matmul(p.transpose(-1, -2), do[:, :, q0:q1])
            ds = p * (torch.matmul(do[:, :, q0:q1], vf.transpose(-1, -2)) - delta[:, :, q0:q1])
            dq[:, :, q0:q1] = torch.matmul(ds, kf) * ctx.scale
            dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, q0:q1]) * ctx.scale
        if groups != n:
            dk = dk.view(b, groups, n // groups, sk, d).sum(2)
            dv = dv.view(b, groups, n // groups, sk, d).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, block_mask: BlockMask | None, scale: float) -> torch.Tensor:
    """FlexAttention of q [b, n, sq, d], k / v [b, groups, sk, d] under `block_mask` -> [b, n, sq, d]."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _CPUFlexAttention.apply(q, k, v, block_mask, scale, gqa)
        return _eager_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


class FlexAttention(MegatronModule):
    """megatron-core core attention on FlexAttention.

    query [sq, b, heads/tp, d], key / value [sk, b, groups/tp, d] -> context [sq, b, heads/tp * d].
    """

    _last = None  # (dense mask, its shape key, its BlockMask): the layers of one forward share one conversion

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        check_core_attention_config(config, "flex")
        dropout = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        if dropout > 0:
            raise ValueError("the flex attention backend has no attention dropout")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("the flex attention backend does not take packed sequences")
        if attention_bias is not None:
            raise NotImplementedError("the flex attention backend does not take an attention bias")
        sq, b, heads, d = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
        if isinstance(attention_mask, BlockMask):
            block_mask = attention_mask  # built for this spec's attention (the mask's causality included)
        elif attention_mask is not None and self._last is not None and self._last[0] is attention_mask \
                and self._last[1] == (causal, b, sq, sk):
            block_mask = self._last[2]  # the same dense mask as the previous layer's: one conversion a forward
        else:
            block_mask = block_mask_of(attention_mask, causal, b, sq, sk, q.device)
            if attention_mask is not None:
                FlexAttention._last = (attention_mask, (causal, b, sq, sk), block_mask)
        context = flex(q, k, v, block_mask, self.softmax_scale)
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """No parameters, nothing to checkpoint (as megatron's vanilla-softmax DotProductAttention)."""
        return {}
