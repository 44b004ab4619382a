"""The objective contract: corrupt a batch of clean tokens, then turn per-token losses into a loss.

Every objective maps clean token windows `tokens` [batch, seq + 1] and their global sample indices
[batch] to an `ObjectiveBatch`: the model input, the labels, and a per-token loss weight.  The
model returns per-token cross-entropy [batch, seq]; the micro-batch's loss is
`sum(ce * weight)` over `num_tokens` tokens.  Losses are reported as (sum, count) pairs, so the
global-batch loss is the same however the batch is split over ranks and micro-batches.

All noise comes from `ops.masking.mask_tokens`, keyed by (seed, global sample index).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the traits are read without torch (see megatron_dataeff/lazy.py)
    import torch

    from megatron_dataeff.objectives.documents import DocumentFlags
    from megatron_dataeff.objectives.row_masks import RowMask


@dataclass
class ObjectiveBatch:
    """What the model sees and how its per-token losses are weighted."""

    input_ids: torch.Tensor  # [batch, seq] model input (possibly corrupted)
    labels: torch.Tensor  # [batch, seq] targets
    loss_weight: torch.Tensor  # [batch, seq] float32 weight of each position's cross-entropy
    # the loss normaliser of this micro-batch: an int, or a 0-d tensor where it depends on the tokens
    # (--eod-mask-loss), left on the tokens' device so that building a batch never waits for it
    num_tokens: int | torch.Tensor
    mask: torch.Tensor | None = None  # [batch, seq] bool, positions replaced by the mask token
    # Named parts of the loss reported on their own (e.g. MIR's clean and corrupted rows):
    # name -> (report weight [batch, seq] float32, tokens it is normalised by)
    parts: dict[str, tuple[torch.Tensor, int]] | None = None
    # what each row attends to where rows need their own attention mask (the dual objective's per-sample
    # causality, --reset-attention-mask's documents); None: the layer spec's mask type decides
    row_mask: RowMask | None = None
    # [batch, seq] int64 position ids (--reset-position-ids: restarting after each EOD); None: 0..seq-1
    position_ids: torch.Tensor | None = None
    # [batch] each row's share of `num_tokens` where rows count different tokens (--eod-mask-loss); None: equal
    row_tokens: torch.Tensor | None = None

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """[batch, 1, seq, seq] bool, True = masked out (megatron's convention) of `row_mask`, or None."""
        return self.row_mask.dense() if self.row_mask is not None else None


class Objective(abc.ABC):
    """Corrupt the batch, weight the loss.

    A subclass is the one home of its objective's traits, read by the model builder, the attention choice,
    the FLOPs and memory estimates, the trainer, evaluation and export: the class attributes below, and the
    class methods that depend on the run's flags (`rows_per_sample`, `input_noise`), which take the
    ObjectiveConfig so that they answer before any tokenizer or model exists.  A new objective is one module
    with its subclass plus its entry in `objectives/__init__.py`'s registry."""

    name: str = ""  # the --objective value it trains (a variant shares its base's)
    bidirectional: bool = False  # the model's layer spec attends both ways
    diffusion: bool = False  # a masked-diffusion model: ELBO validation, diffusion sampling and export
    row_attention_masks: bool = False  # each row carries its own attention mask (ObjectiveBatch.row_mask)
    part_names: tuple[str, ...] = ()  # the names of ObjectiveBatch.parts, the same for every batch
    evaluation_views: tuple[str, ...] = ("",)  # validation views (the dual objective: "ar" and "mdm")
    monte_carlo: bool = False  # the evaluation loss depends on drawn noise (more copies, less variance)
    token_positions: bool = False  # its batches carry position ids of their own (ObjectiveBatch.position_ids)
    # how the documents packed into a window are treated (objectives/documents.py); None: one stream
    documents: DocumentFlags | None = None

    def __init__(self, mask_token_id: int, seed: int):
        self.mask_token_id = int(mask_token_id)
        self.seed = int(seed)

    @classmethod
    def selects(cls, ocfg) -> bool:
        """Whether this class trains an ObjectiveConfig whose --objective is `name` (a variant registered before
        its base answers for the flags that select it: AR with token dropout)."""
        return True

    @classmethod
    def from_config(cls, cfg, mask_token_id: int, vocab_ids: int | None = None, train_iters: int | None = None
                    ) -> "Objective":
        """This objective for a RunConfig (see `objectives.build_objective`)."""
        return cls(mask_token_id, cfg.optim.seed)

    @classmethod
    def rows_per_sample(cls, ocfg) -> int:
        """Model rows per sample in training batches (MIR: clean + corrupted)."""
        return 1

    @classmethod
    def sequence_multiple(cls, ocfg) -> int:
        """Model tokens per window token in a row (block diffusion's [x_t | x_0] rows: 2)."""
        return 1

    @classmethod
    def attention_span(cls, ocfg, seq: int) -> float:
        """Keys a query attends to on average in a window of `seq` tokens (for the FLOPs count)."""
        return seq if cls.bidirectional else seq / 2

    @classmethod
    def input_noise(cls, ocfg) -> tuple[str, float | None] | None:
        """(noise, span) of the input corruption in training (`ops.corruption`), None without one."""
        return None

    @abc.abstractmethod
    def prepare(self, tokens: torch.Tensor, sample_index: torch.Tensor, *, evaluation: bool = False
                ) -> ObjectiveBatch:
        """tokens [batch, seq + 1] (clean), sample_index [batch] int64 -> ObjectiveBatch."""

    def loss(self, per_token_loss: torch.Tensor, batch: ObjectiveBatch) -> tuple[torch.Tensor, int]:
        """(weighted loss sum, num_tokens) of a micro-batch from per-token cross-entropy [batch, seq]."""
        weight = batch.loss_weight.to(device=per_token_loss.device)
        return (per_token_loss.float() * weight).sum(), batch.num_tokens

    def view(self, name: str) -> "Objective":
        """The objective one validation view evaluates with (itself, for single-view objectives)."""
        return self

    def describe(self) -> str:
        """One line of what is trained (the start-up line)."""
        return self.name

    # Packed documents (objectives/documents.py): every objective builds its rows from the clean input tokens
    # x = tokens[:, :-1] of their samples and asks these three.

    def _loss_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """[rows, seq] float32 1 where a position carries loss, 0 on EOD inputs under --eod-mask-loss; None: all."""
        return self.documents.loss_keep(x) if self.documents is not None else None

    def _count(self, x: torch.Tensor, keep: torch.Tensor | None):
        """The positions of rows `x` that count in the loss's normaliser (an int, or a 0-d tensor with `keep`)."""
        return x.numel() if keep is None else keep.sum()

    @staticmethod
    def _row_tokens(keep: torch.Tensor | None) -> torch.Tensor | None:
        """[rows] each row's count in the normaliser with `keep`, None without (every row counts its length)."""
        return None if keep is None else keep.sum(-1)

    def _with_documents(self, batch: ObjectiveBatch, x: torch.Tensor, causal) -> ObjectiveBatch:
        """`batch` whose rows (clean inputs `x`) take the document flags' position ids and attention masks;
        `causal`: whether the rows attend causally (a bool, or [rows] bool).  A row's own mask (the dual
        objective's AR rows) is part of the document mask, which then replaces it."""
        if self.documents is None:
            return batch
        batch.position_ids = self.documents.positions(x)
        mask = self.documents.row_mask(x, causal)
        if mask is not None:
            batch.row_mask = mask
        return batch

    def loss_parts(self, per_token_loss: torch.Tensor, batch: ObjectiveBatch) -> dict[str, tuple[torch.Tensor, int]]:
        """{part: (loss sum, tokens)} of the named parts of a training batch (none for most objectives)."""
        out = {}
        for name in self.part_names:
            weight, tokens = batch.parts[name]
            out[name] = ((per_token_loss.detach().float() * weight.to(per_token_loss.device)).sum(), tokens)
        return out

    # Evaluation of a checkpoint: per-window values (for a standard error) and, for objectives whose
    # validation loss is a Monte-Carlo estimate (`monte_carlo`), several noisy copies of each window.

    def prepare_evaluation(self, tokens: torch.Tensor, window_index: torch.Tensor, copies: int = 1
                           ) -> ObjectiveBatch:
        """The evaluation batch of `copies` noisy copies of each window, rows window-major: copy j of window
        i is evaluation sample `window_index[i] * copies + j`, so one copy is exactly what the trainer's
        validation (`prepare(..., evaluation=True)`) sees.  Objectives without noise take one copy."""
        if copies != 1:
            raise ValueError(f"{self.name}: evaluation is deterministic; copies must be 1, got {copies}")
        return self.prepare(tokens, window_index, evaluation=True)

    def row_totals(self, per_token_loss: torch.Tensor, batch: ObjectiveBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows] loss sum, [rows] tokens) of each row: `loss`'s sum restricted to the row and the row's share of
        `num_tokens` (their totals are `loss`'s pair)."""
        weight = batch.loss_weight.to(device=per_token_loss.device, dtype=per_token_loss.dtype)
        sums = (per_token_loss * weight).sum(-1)
        rows = per_token_loss.shape[0]
        if batch.row_tokens is not None:
            tokens = batch.row_tokens.to(device=sums.device, dtype=sums.dtype)
        else:
            tokens = sums.new_full((rows,), float(batch.num_tokens) / rows)
        return sums, tokens

    def sample_losses(self, per_token_loss: torch.Tensor, batch: ObjectiveBatch) -> torch.Tensor:
        """[batch] loss of each row: its loss sum over its share of `num_tokens` (`row_totals`)."""
        sums, tokens = self.row_totals(per_token_loss, batch)
        return sums / tokens
