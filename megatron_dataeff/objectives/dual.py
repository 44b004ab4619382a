"""The dual objective: AR and masked diffusion in one model with no architectural change (Samuel &
Charpentier, "Dual Language Models", arXiv 2512.14549).

Each training sample is trained either AR (input tokens[:-1], labels tokens[1:], weight 1, a causal
attention mask) or as masked diffusion (input tokens[:-1] masked at rate p = (1 - eps) t + eps, labels the
clean tokens[:-1], weight 1/p on masked positions, no attention mask), as its key decides:
AR iff uniform(seed, sample, STREAM_OBJECTIVE) < ar_fraction.  The model's layer spec attends both ways;
each AR row carries its own causal mask (`ObjectiveBatch.row_mask`), so a micro-batch mixes both kinds and every layout sees the same choice per sample.  Both
halves are per token of the micro-batch (one normaliser, batch x length), so the loss is the ar_fraction-
weighted mix of the two; they are reported on their own as `ar` (NLL) and `mdm` (ELBO).

Validation has two views, `ar` (every row AR: the NLL) and `mdm` (every row masked diffusion: the ELBO).
"""

from __future__ import annotations

from megatron_dataeff.lazy import lazy_module
from megatron_dataeff.objectives.base import Objective, ObjectiveBatch
from megatron_dataeff.objectives.mdm import MaskedDiffusionObjective, schedule_note

torch = lazy_module("torch")
philox = lazy_module("megatron_dataeff.ops.philox")
row_masks = lazy_module("megatron_dataeff.objectives.row_masks")


def _ar_rows(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens[:, :-1], tokens[:, 1:]


class DualObjective(Objective):
    """Per sample AR or masked diffusion, in one bidirectional model with per-row attention masks."""

    name = "dual"
    bidirectional = True  # the layer spec attends both ways; AR rows carry their causal mask
    row_attention_masks = True
    part_names = ("ar", "mdm")
    evaluation_views = ("ar", "mdm")

    def __init__(self, mask_token_id: int, seed: int, ar_fraction: float = 0.5, eps: float = 1e-3,
                 t_min: float | None = None, t_max: float = 1.0):
        super().__init__(mask_token_id, seed)
        if not 0.0 < ar_fraction < 1.0:
            raise ValueError(f"ar_fraction must be in (0, 1), got {ar_fraction}")
        self.ar_fraction = float(ar_fraction)
        self.mdm = MaskedDiffusionObjective(mask_token_id, seed, eps=eps, t_min=t_min, t_max=t_max)

    @classmethod
    def from_config(cls, cfg, mask_token_id, vocab_ids=None, train_iters=None):
        o = cfg.objective
        return cls(mask_token_id, cfg.optim.seed, ar_fraction=o.ar_fraction, eps=o.mdm_eps, t_min=o.t_min,
                   t_max=o.mdm_t_max)

    @classmethod
    def input_noise(cls, ocfg):
        return "mask", None

    def describe(self) -> str:
        return (f"dual: AR on {self.ar_fraction:g} of the samples, masked diffusion on the rest"
                + schedule_note(self.mdm.eps, self.mdm.t_min, self.mdm.t_max))

    def is_ar(self, sample_index: torch.Tensor) -> torch.Tensor:
        """[batch] bool: which samples are trained AR (keyed by the sample, the same in every layout)."""
        u = philox.uniform(self.seed, sample_index.to("cpu"), philox.STREAM_OBJECTIVE, 1)[:, 0]
        return u < torch.tensor(self.ar_fraction, dtype=torch.float32)

    def _mixed(self, tokens: torch.Tensor, ar: torch.Tensor, diffusion: ObjectiveBatch) -> ObjectiveBatch:
        """Rows `ar` (bool [batch]) AR, the others the masked-diffusion batch `diffusion`."""
        b, s = diffusion.input_ids.shape
        n_ar = int(ar.sum())  # ar lives on the host: no device sync
        ar = ar.to(tokens.device)
        row = ar[:, None]
        ar_in, ar_labels = _ar_rows(tokens)
        ones = torch.ones((b, s), dtype=torch.float32, device=tokens.device)
        mdm_weight = diffusion.loss_weight.to(tokens.device)
        keep = self._loss_keep(ar_in)  # ar_in is the clean input of both kinds of row (x0 = tokens[:, :-1])
        if keep is None:
            counts = (b * s, n_ar * s, (b - n_ar) * s)
        else:
            ones, mdm_weight = keep, mdm_weight * keep
            counts = (keep.sum(), (keep * row).sum(), (keep * ~row).sum())
        weight = torch.where(row, ones, mdm_weight)
        batch = ObjectiveBatch(
            input_ids=torch.where(row, ar_in, diffusion.input_ids), labels=torch.where(row, ar_labels, diffusion.labels),
            loss_weight=weight, num_tokens=counts[0], row_tokens=self._row_tokens(keep),
            mask=torch.where(row, torch.zeros_like(diffusion.mask), diffusion.mask),
            row_mask=row_masks.causal_rows(ar, s),
            parts={"ar": (torch.where(row, ones, torch.zeros_like(ones)), counts[1]),
                   "mdm": (torch.where(row, torch.zeros_like(ones), mdm_weight), counts[2])})
        return self._with_documents(batch, ar_in, causal=ar)

    def prepare(self, tokens, sample_index, *, evaluation=False):
        if evaluation:
            raise ValueError("the dual objective validates each view on its own: use view('ar') / view('mdm')")
        return self._mixed(tokens, self.is_ar(sample_index), self.mdm.prepare(tokens, sample_index))

    def view(self, name: str) -> Objective:
        """The objective of one validation view: every row AR (with its causal mask) or masked diffusion;
        "" is the training objective itself."""
        if name == "":
            return self
        if name not in self.evaluation_views:
            raise ValueError(f"the dual objective's views are {self.evaluation_views}, not {name!r}")
        return _DualView(self, name)


class _DualView(Objective):
    """Validation of a dual model as AR or as masked diffusion (its model attends both ways)."""

    def __init__(self, dual: DualObjective, view: str):
        super().__init__(dual.mask_token_id, dual.seed)
        self.dual, self.view_name = dual, view
        self.documents = dual.documents
        self.name = f"dual:{view}"
        self.monte_carlo = view == "mdm"

    def _all(self, tokens, batch_or_none: ObjectiveBatch | None):
        b = tokens.shape[0]
        ar = torch.full((b,), self.view_name == "ar", dtype=torch.bool)
        if batch_or_none is None:  # AR rows only: the diffusion batch is a placeholder of the same shape
            x0 = tokens[:, :-1]
            batch_or_none = ObjectiveBatch(input_ids=x0, labels=x0,
                                           loss_weight=torch.zeros(x0.shape, device=x0.device), num_tokens=x0.numel(),
                                           mask=torch.zeros(x0.shape, dtype=torch.bool, device=x0.device))
        out = self.dual._mixed(tokens, ar, batch_or_none)
        out.parts = None
        return out

    def prepare(self, tokens, sample_index, *, evaluation=False):
        if self.view_name == "ar":
            return self._all(tokens, None)
        return self._all(tokens, self.dual.mdm.prepare(tokens, sample_index, evaluation=True))

    def prepare_evaluation(self, tokens, window_index, copies=1):
        if self.view_name == "ar":
            return super().prepare_evaluation(tokens, window_index, copies)
        diffusion = self.dual.mdm.prepare_evaluation(tokens, window_index, copies)
        return self._all(tokens.repeat_interleave(copies, 0), diffusion)
