"""The losses megatron-core does not have: a vocab-parallel cross entropy in chunks of tokens (no fp32 copy of
the logits kept), and a fused linear + cross entropy (Cut Cross-Entropy: no logits at all) at the end.

megatron-core's `vocab_parallel_cross_entropy` (and its "fused" variant) casts the whole logits tensor
[seq, batch, vocab/tp] to fp32 and saves the fp32 softmax for backward: for vocabulary 151,936 at
sequence 4096 that is 2.3 GiB per sample on top of the bf16 logits.  Here the forward passes over the
logits in chunks of tokens, keeping per token only the max logit and the sum of exponentials (fp32,
[tokens]); the backward recomputes each chunk's softmax from the saved logits and writes the gradient
over them.  What is kept for backward is the logits tensor itself (which the output layer produced
anyway) and 8 bytes per token; beyond that the loss needs one fp32 chunk (<= 256 MiB by default).

The arithmetic is megatron's, row by row (subtract the TP-wide max, gather the target logit, exp,
sum, all-reduce, log(sum) - target; gradient softmax - one-hot times the incoming gradient), so the
losses and gradients equal megatron's to the last bit where torch reduces each row the same way
(tested on CPU).  The forward reads each chunk once (under tensor parallelism: one small max
all-reduce per chunk, then one for the sums); the backward reads it again to rebuild the softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dataeff.config import auto_chunk_tokens



def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _group_rank_size(group):
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, chunk, group):
        rank, world = _group_rank_size(group)
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        tgt = target.reshape(-1)
        n = flat.shape[0]
        start, end = rank * vocab, (rank + 1) * vocab
        outside = (tgt < start) | (tgt >= end)
        local_target = (tgt - start).masked_fill(outside, 0)

        logits_max = torch.empty(n, dtype=torch.float32, device=flat.device)
        predicted = torch.empty(n, dtype=torch.float32, device=flat.device)
        sum_exp = torch.empty(n, dtype=torch.float32, device=flat.device)
        for c in _chunks(n, chunk):
            # the max in the logits' own dtype is exact; fp32 logits are shifted into a new tensor (they must
            # stay intact), others upcast first (torch's mixed-dtype subtraction is slower on CPUs)
            mx = flat[c].max(dim=-1)[0].float()
            if world > 1:  # one small all-reduce per chunk: the chunk's rows are read once
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
            logits_max[c] = mx
            if flat.dtype == torch.float32:
                x = flat[c] - mx.unsqueeze(-1)
            else:
                x = flat[c].float().sub_(mx.unsqueeze(-1))
            rows = torch.arange(x.shape[0], device=x.device)
            predicted[c] = x[rows, local_target[c]]
            sum_exp[c] = torch.exp_(x).sum(dim=-1)
        predicted.masked_fill_(outside, 0.0)
        if world > 1:
            both = torch.cat((predicted, sum_exp))
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
            predicted, sum_exp = both[:n], both[n:]
        loss = torch.log(sum_exp) - predicted

        ctx.save_for_backward(logits, logits_max, sum_exp, local_target, outside)
        ctx.chunk = chunk
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, logits_max, sum_exp, local_target, outside = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        grad_flat = grad_loss.reshape(-1).float()
        update = 1.0 - outside.float()
        # The gradient is written over the logits, which nothing needs after the loss's backward (the
        # output layer's backward needs its input and weight); like megatron's loss, which overwrites its
        # saved softmax, this backward can run once.
        # fp32 logits become their gradient in place, chunk by chunk (no copy); others through one fp32 chunk.
        grad = flat
        in_place = flat.dtype == torch.float32
        for c in _chunks(flat.shape[0], ctx.chunk):
            x = (flat[c] if in_place else flat[c].float()).sub_(logits_max[c].unsqueeze(-1))
            torch.exp_(x)
            x.div_(sum_exp[c].unsqueeze(-1))
            rows = torch.arange(x.shape[0], device=x.device)
            x[rows, local_target[c]] -= update[c]
            x.mul_(grad_flat[c].unsqueeze(-1))
            if not in_place:
                grad[c] = x
        return grad.view(logits.shape), None, None, None


def chunked_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, chunk_tokens: int | None,
                                         group=None) -> torch.Tensor:
    """Per-token cross entropy of logits [seq, batch, vocab/tp] (this rank's vocabulary shard) against
    target [seq, batch] (global ids); `chunk_tokens` None = automatic."""
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(logits.shape[-1])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedVocabParallelCrossEntropy.apply(logits, target, int(chunk_tokens), group)


# ----------------------------------------------------------------------------------------------
# Fused linear + cross entropy: the output layer and the loss in one, the logits never formed


def linear_cross_entropy_available() -> bool:
    """Whether Apple's Cut Cross-Entropy (`pip install cut-cross-entropy`) imports here."""
    try:
        import cut_cross_entropy  # noqa: F401
    except Exception:  # ImportError, or its triton kernels failing to load
        return False
    return True


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [batch, seq] (fp32) of the output layer's logits hidden [seq, batch, h] @ weight^T
    ([vocab, h], the whole vocabulary: TP = 1) against labels [batch, seq], by Cut Cross-Entropy: the logits are
    computed block by block in its kernels (torch.compile'd torch on CPUs) and never kept; the gradient is exact
    (its filtering of small softmax entries is off)."""
    from cut_cross_entropy import linear_cross_entropy as cce

    b, s = labels.shape
    e = hidden.transpose(0, 1).reshape(b * s, hidden.shape[-1])
    impl = "cce" if hidden.is_cuda else "torch_compile"
    loss = cce(e, weight.to(e.dtype), labels.reshape(-1), reduction="none", filter_eps=None, impl=impl)
    return loss.float().view(b, s)
