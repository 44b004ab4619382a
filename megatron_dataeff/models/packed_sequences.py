"""Packed sequences (megatron-core's `thd` format) for packed documents: a micro-batch's rows laid end to end as
one stream in which every document is a sequence of its own, for attention that takes sequence boundaries
(`cu_seqlens`) instead of a mask: transformer-engine's THD path (FlashAttention / cuDNN variable-length kernels,
no `[seq, seq]` mask, no work on scores across documents).

A `RowMask` with documents and one causality for all its rows (the layer spec's: causal AR rows, masked
diffusion's rows both ways) becomes `PackedSeqParams`: a sequence starts at every row start and after every EOD,
so attention inside each sequence under the spec's mask type is exactly the document mask.  Masks with a
causality per row (the dual objective) or blocks (block diffusion) are not one mask type: they are not packed.

Rotary positions: with per-token position ids (--reset-position-ids, `DataEffGPTModel._preprocess`) the rotary
table covers every token of the stream, and megatron-core's THD rotary path maps it token by token; without
them megatron's table starts at 0 in each sequence, which inside a document scores the same (RoPE is relative
and attention stays inside the document).

Finding the boundaries (`nonzero`) reads the device once per micro-batch.
"""

from __future__ import annotations

from megatron_dataeff.lazy import lazy_module

torch = lazy_module("torch")


def packable(row_mask) -> bool:
    """Whether `row_mask` is a document mask one attention mask type expresses (see the module docstring)."""
    return row_mask is not None and row_mask.documents is not None and row_mask.block_size is None \
        and isinstance(row_mask.causal, bool)


def packed_seq_params(row_mask):
    """megatron-core's PackedSeqParams (`thd`) of a document RowMask over its rows laid end to end: cu_seqlens
    [sequences + 1] int32 on the mask's device, max_seqlen the row length (a bound: a document piece is at most a
    row)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if not packable(row_mask):
        raise ValueError("packed sequences take a document mask with one causality for every row and no blocks")
    documents = row_mask.documents
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu_seqlens = torch.cat([first, first.new_full((1,), documents.numel())]).to(torch.int32)
    seq = documents.shape[1]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=seq, max_seqlen_kv=seq)


def packed_forward(model, input_ids, position_ids, row_mask, labels=None):
    """`model` (a GPTModel stage) on the rows of `input_ids` [rows, seq] packed into one stream of documents.  The
    last stage's output comes back per row: per-token losses [rows, seq] with labels, logits [rows, seq, vocab]
    without; an earlier stage's hidden states stay packed ([rows * seq, 1, hidden]: what the next stage takes)."""
    rows, seq = input_ids.shape
    params = packed_seq_params(row_mask)
    out = model(input_ids.reshape(1, rows * seq), position_ids.reshape(1, rows * seq), None,
                labels=None if labels is None else labels.reshape(1, rows * seq), packed_seq_params=params)
    return unpack(out, rows, seq)


def unpack(output, rows: int, seq: int):
    """A packed forward's output per row: [1, rows * seq] losses -> [rows, seq], [1, rows * seq, vocab] logits ->
    [rows, seq, vocab]; hidden states of an earlier pipeline stage ([rows * seq, 1, hidden]) as they are."""
    if output.dim() == 2 and output.shape == (1, rows * seq):
        return output.reshape(rows, seq)
    if output.dim() == 3 and output.shape[:2] == (1, rows * seq):
        return output.reshape(rows, seq, output.shape[-1])
    return output
