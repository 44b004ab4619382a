"""Packed documents: Megatron-LM's `--reset-position-ids`, `--reset-attention-mask` and `--eod-mask-loss`.

A training window is cut from the stream of documents, each ending in its EOD token, so it usually holds the end
of one document and the start of the next.  The three flags mean what they mean in Megatron-LM
(`get_ltor_masks_and_position_ids`), read on a row's clean input tokens x = tokens[:-1] (AR's input, masked
diffusion's x0; the same tokens for every objective):

- a document ends with its EOD: the position after an EOD starts the next document (the EOD belongs to the
  document it ends);
- `reset_position_ids`: positions count from 0 in each document (the rotary embedding takes them per token);
- `reset_attention_mask`: a position attends only to positions of its own document: causally for AR rows, both
  ways for masked-diffusion rows;
- `eod_mask_loss`: positions whose input token is EOD carry no loss and leave the loss's normaliser (AR: the
  prediction of the next document's first token from the EOD; masked diffusion: the EOD itself).

Noise is drawn as without the flags (keyed by sample and position), so the flags change what the model sees and
what is counted, never the draws.  The boundaries come from the clean tokens, so an EOD replaced by noise still
ends its document.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dataeff.lazy import lazy_module
from megatron_dataeff.objectives.row_masks import RowMask

torch = lazy_module("torch")


@dataclass(frozen=True)
class DocumentFlags:
    """How an objective treats the documents packed into a window."""

    eod_token_id: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @classmethod
    def from_config(cls, dcfg, eod_token_id: int | None) -> "DocumentFlags | None":
        """The flags of a DataConfig (None when none is on); they need the tokenizer's EOD id."""
        if not (dcfg.reset_position_ids or dcfg.reset_attention_mask or dcfg.eod_mask_loss):
            return None
        if eod_token_id is None:
            raise ValueError("--reset-position-ids / --reset-attention-mask / --eod-mask-loss need the tokenizer's "
                             "EOD token id")
        return cls(int(eod_token_id), bool(dcfg.reset_position_ids), bool(dcfg.reset_attention_mask),
                   bool(dcfg.eod_mask_loss))

    def describe(self) -> str:
        """The flags that are on, by name (the start-up line)."""
        return ", ".join(flags_on(self))

    def loss_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """[rows, seq] float32 1 where a position carries loss (0 on EOD inputs with eod_mask_loss), or None."""
        if not self.eod_mask_loss:
            return None
        return (x != self.eod_token_id).to(torch.float32)

    def positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """[rows, seq] int64 position ids restarting after each EOD, or None (positions 0..seq-1)."""
        if not self.reset_position_ids:
            return None
        return document_positions(x, self.eod_token_id)

    def row_mask(self, x: torch.Tensor, causal) -> RowMask | None:
        """What rows `x` attend to: their own document, causally in rows that are `causal` (a bool, or a [rows]
        bool tensor); None without reset_attention_mask."""
        if not self.reset_attention_mask:
            return None
        return RowMask(causal, document_ids(x, self.eod_token_id))


def flags_on(flags) -> list[str]:
    """The document flags that are on in `flags` (a DataConfig or DocumentFlags: the same field names), by name."""
    return [f"--{name.replace('_', '-')}" for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
            if getattr(flags, name)]


def document_ids(x: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """[rows, seq] int32: the index of each position's document in its row (EODs before it)."""
    eod = (x == eod_token_id).to(torch.int32)
    return (eod.cumsum(-1) - eod).to(torch.int32)


def document_positions(x: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """[rows, seq] int64: each position's offset from the start of its document."""
    seq = x.shape[-1]
    index = torch.arange(seq, device=x.device).expand(x.shape)
    starts = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    starts[..., 1:] = x[..., :-1] == eod_token_id
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    return index - start_index

