"""Block diffusion (Arriola et al. 2025, "Block Diffusion", BD3-LM): the objectives between AR and masked
diffusion.

The window x0 = tokens[:-1] (L tokens) is cut into blocks of B tokens.  Each block is noised as masked
diffusion does it: a rate t per block (`--block-noise per-block`; one per sequence with `shared`),
p = (1 - eps) t + eps (in training (t_max - t_min) t + t_min with a clipped schedule, --mdm-t-min / --mdm-t-max,
as BD3-LM trains), each token replaced by the mask token with probability p.  BD3-LM's training form puts
the noisy and the clean sequence in one row of 2L tokens, [x_t | x_0], positions repeated (0..L-1 twice), under
one mask: a noisy block attends to itself both ways and to the clean blocks before it; a clean block attends
block-causally to the clean blocks up to itself (so the clean half is AR over blocks, and never sees noise).  The
loss is masked diffusion's on the noisy half: CE / p over masked positions, divided by the window's tokens, a
Monte-Carlo estimate of the negative ELBO per token (nats, an upper bound on the NLL like mdm's); the clean
half carries no loss.  B = L is masked diffusion exactly (one block, which sees only itself); B = 1 with every
token masked is next-token prediction from the clean prefix.

Noise is keyed like every objective's: per sample for t (per block: the sample's rate stream, one uniform per
block, the first being mdm's t) and per position for the mask (mdm's token stream), so B = L draws mdm's noise.
Validation uses the evaluation streams; `copies` noisy copies stratify each block's t over [0, 1).
"""

from __future__ import annotations

from megatron_dataeff.lazy import lazy_module
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch
from megatron_dataeff.objectives.mdm import schedule_note

torch = lazy_module("torch")
philox = lazy_module("megatron_dataeff.ops.philox")
masking = lazy_module("megatron_dataeff.ops.masking")
row_masks = lazy_module("megatron_dataeff.objectives.row_masks")
documents_ = lazy_module("megatron_dataeff.objectives.documents")


class BlockDiffusionObjective(Objective):
    """Masked diffusion inside blocks of `block_size` tokens, AR over blocks ([x_t | x_0] rows, BD3-LM)."""

    name = "block"
    bidirectional = True  # the layer spec attends both ways; the row mask makes it block-causal
    diffusion = True  # validation is an ELBO
    row_attention_masks = True
    monte_carlo = True
    token_positions = True  # positions 0..L-1 on both halves

    def __init__(self, mask_token_id: int, seed: int, block_size: int, eps: float = 1e-3, shared_noise: bool = False,
                 t_min: float | None = None, t_max: float = 1.0):
        super().__init__(mask_token_id, seed)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.eps, self.shared_noise = int(block_size), float(eps), bool(shared_noise)
        # training's rates lie in [t_min, t_max) (a clipped schedule when not [eps, 1)); evaluation's in [eps, 1)
        self.t_min, self.t_max = (self.eps if t_min is None else float(t_min)), float(t_max)

    @classmethod
    def from_config(cls, cfg, mask_token_id, vocab_ids=None, train_iters=None):
        o = cfg.objective
        return cls(mask_token_id, cfg.optim.seed, o.block_size, eps=o.mdm_eps, shared_noise=o.block_noise == "shared",
                   t_min=o.t_min, t_max=o.mdm_t_max)

    @classmethod
    def input_noise(cls, ocfg):
        return "mask", None

    @classmethod
    def sequence_multiple(cls, ocfg) -> int:
        return 2

    @classmethod
    def attention_span(cls, ocfg, seq: int) -> float:
        """Keys per query on average: the clean blocks before a query's block (half the window) and half of its
        own block."""
        return seq / 2 + ocfg.block_size / 2

    def describe(self) -> str:
        return (f"block diffusion: blocks of {self.block_size} tokens, a mask rate per "
                f"{'sequence' if self.shared_noise else 'block'} ([x_t | x_0] rows, BD3-LM)"
                + schedule_note(self.eps, self.t_min, self.t_max))

    def rates(self, sample_index: torch.Tensor, blocks: int, stream_offset: int, stratify: int = 0) -> torch.Tensor:
        """[batch, blocks] float32 masking probability p of each block (stratified over groups of `stratify`
        consecutive sample indices for evaluation copies)."""
        lo, hi = (self.eps, 1.0) if stream_offset else (self.t_min, self.t_max)  # evaluation: the whole schedule
        p = masking.sample_rates(sample_index.to("cpu"), self.seed, mode="mdm", eps=lo, rate=hi, stratify_group=stratify,
                                 stream_offset=stream_offset, columns=1 if self.shared_noise else blocks)
        return p.reshape(p.shape[0], -1).expand(-1, blocks)  # one column per block (shared: one rate for all)

    def _noised(self, tokens: torch.Tensor, sample_index: torch.Tensor, evaluation: bool, stratify: int = 0
                ) -> ObjectiveBatch:
        x0 = tokens[:, :-1].contiguous()
        b, L = x0.shape
        if L % self.block_size:
            raise ValueError(f"block size {self.block_size} does not divide the window's {L} tokens")
        offset = philox.EVAL_STREAM_OFFSET if evaluation else 0
        blocks = L // self.block_size
        p = self.rates(sample_index, blocks, offset, stratify).repeat_interleave(self.block_size, 1)  # [b, L]
        u = philox.uniform(self.seed, sample_index.to("cpu"), philox.STREAM_TOKEN + offset, L)
        mask = (u < p).to(x0.device)
        p = p.to(x0.device)
        weight = torch.where(mask, 1.0 / p, torch.zeros((), dtype=torch.float32, device=x0.device))
        keep = self._loss_keep(x0)
        if keep is not None:
            weight = weight * keep
        x_t = torch.where(mask, torch.tensor(self.mask_token_id, dtype=x0.dtype, device=x0.device), x0)
        zeros = torch.zeros_like(weight)
        positions = self.documents.positions(x0) if self.documents is not None else None
        if positions is None:
            positions = torch.arange(L, device=x0.device).expand(b, L)
        documents = None
        if self.documents is not None and self.documents.reset_attention_mask:
            documents = documents_.document_ids(x0, self.documents.eod_token_id).repeat(1, 2)
        return ObjectiveBatch(
            input_ids=torch.cat([x_t, x0], 1), labels=torch.cat([x0, x0], 1),
            loss_weight=torch.cat([weight, zeros], 1), num_tokens=self._count(x0, keep), row_tokens=self._row_tokens(keep),
            mask=torch.cat([mask, torch.zeros_like(mask)], 1), position_ids=torch.cat([positions, positions], 1),
            row_mask=row_masks.RowMask(False, documents, rows=b, seq=2 * L, block_size=self.block_size,
                                       device=x0.device))

    def prepare(self, tokens, sample_index, *, evaluation=False):
        return self._noised(tokens, sample_index, evaluation)

    def prepare_evaluation(self, tokens, window_index, copies=1):
        """`copies` noisy copies of each window, each block's rate stratified over [0, 1) (t_j = (j + u) / copies);
        one copy is the trainer's validation."""
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        n = int(copies)
        if n == 1:
            return self._noised(tokens, window_index.to(torch.int64), True)
        rows = tokens.repeat_interleave(n, 0)
        index = window_index.to(torch.int64).repeat_interleave(n) * n + torch.arange(n).repeat(tokens.shape[0])
        return self._noised(rows, index, True, stratify=n)
