"""What each row of a batch attends to, where the layer spec's one mask (causal, or full) is not enough.

A `RowMask` is the compact form an objective hands the model: per row, whether it attends causally, and the
document index of each position (--reset-attention-mask) where attention stays inside documents.  One
`mask_mod(b, h, q, kv) -> keep` defines it, evaluated two ways:

- `dense()`: megatron's `[rows, 1, seq, seq]` bool attention mask (True = masked out), for sdpa and megatron's
  local attention;
- `block_mask()`: a FlexAttention `BlockMask` (only [rows, seq] document ids and [rows] flags behind it, never a
  [seq, seq] tensor kept), for `--attention-backend flex`.

Causality is part of the mask (`causal` rows see keys <= the query), so the mask means the same under a causal
layer spec and a bidirectional one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dataeff.lazy import lazy_module

torch = lazy_module("torch")


@dataclass
class RowMask:
    """Which keys each row's queries see: own document only (when `documents` is given), and causally in the
    rows that are `causal`."""

    causal: object  # bool (every row), or a [rows] bool tensor
    documents: torch.Tensor | None = None  # [rows, seq] int32 document index of each position; None: one stream
    rows: int = 0
    seq: int = 0
    # block diffusion (objectives/block.py): a row is [noisy | clean] halves of seq / 2 tokens in blocks of this
    # size; a noisy block sees itself both ways and the clean blocks before it, a clean block the clean blocks up
    # to itself
    block_size: int | None = None
    device: object = None  # where the masks are built (default: the documents' or the causal flags' device)
    _dense: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.documents is not None:
            self.rows, self.seq = self.documents.shape

    def mask_mod(self):
        """keep(b, h, q, kv) -> bool tensor: True where query q of row b attends to key kv."""
        documents, causal, block, half = self.documents, self.causal, self.block_size, self.seq // 2
        per_row = not isinstance(causal, bool)

        def keep(b, h, q, kv):
            if documents is not None:
                out = documents[b, q] == documents[b, kv]
            else:
                out = torch.ones_like(q >= kv)
            if block is not None:
                clean_q, clean_kv = q >= half, kv >= half
                block_q = torch.where(clean_q, q - half, q) // block
                block_kv = torch.where(clean_kv, kv - half, kv) // block
                out = out & (((block_q == block_kv) & (clean_q == clean_kv))  # its own block, both ways
                             | ((block_q > block_kv) & clean_kv & ~clean_q)  # noisy: the clean blocks before
                             | ((block_q >= block_kv) & clean_kv & clean_q))  # clean: block-causal
            if per_row:
                out = out & ((kv <= q) | ~causal[b])
            elif causal:
                out = out & (kv <= q)
            return out

        return keep

    def _device(self):
        if self.device is not None:
            return self.device
        return self.documents.device if self.documents is not None else self.causal.device

    def dense(self) -> torch.Tensor:
        """[rows, 1, seq, seq] bool, True = masked out (computed once per mask)."""
        if self._dense is None:
            dev = self._device()
            b = torch.arange(self.rows, device=dev)[:, None, None, None]
            q = torch.arange(self.seq, device=dev)[None, None, :, None]
            kv = torch.arange(self.seq, device=dev)[None, None, None, :]
            self._dense = ~self.mask_mod()(b, 0, q, kv)
        return self._dense

    def block_mask(self):
        """FlexAttention's BlockMask of this mask (heads broadcast)."""
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(self.mask_mod(), self.rows, None, self.seq, self.seq, device=self._device())

    def repeat(self, n: int) -> "RowMask":
        """The mask of n copies of the batch stacked row-wise (MIR's [clean; corrupted] rows)."""
        causal = self.causal if isinstance(self.causal, bool) else self.causal.repeat(n)
        documents = None if self.documents is None else self.documents.repeat(n, 1)
        return RowMask(causal, documents, rows=self.rows * n, seq=self.seq, block_size=self.block_size,
                       device=self.device)


def causal_rows(ar: torch.Tensor, seq: int) -> RowMask:
    """Rows `ar` ([rows] bool) causal, the others attending both ways, in one stream."""
    return RowMask(ar, None, rows=ar.shape[0], seq=seq)
