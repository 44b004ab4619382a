"""Likelihood of text under a trained model: AR log-likelihood and masked-diffusion ELBO estimates.

`ModelScorer` wraps any module called as `model(input_ids [b, s], position_ids [b, s], None)` ->
logits [b, s, vocab] (a megatron-core GPTModel from `load_model_for_inference`, or a toy module in
the tests).  Log-probabilities are taken over the model's whole (padded) vocabulary, as in the
training loss, so evaluation numbers and `metrics.jsonl` agree.

AR models: `log p(continuation | context)` is exact (teacher forcing, one forward).

Masked-diffusion models: the log-likelihood is bounded by the ELBO of the continuation given the
context, with only continuation tokens masked (L = continuation length):

    ELBO = E_{k ~ U{1..L}} E_{S ⊂ cont, |S| = k} [ L/k · Σ_{i ∈ S} log p(x_i | context, x_{cont \\ S}) ]

* `method="mc"`: Monte-Carlo with k stratified over the n samples (k_j = ⌊(j + u) L / n⌋ + 1, one
  shared u), S uniform given k; the mean of the n terms is unbiased for the ELBO, its standard error
  is the sample std / √n (conservative under stratification).  L = 1 is exact with one sample.
* `method="exact"`: the ELBO itself, enumerating all 2^L - 1 masked sets (L <= 12).
* `method="chain"`: the chain rule, one forward per token: unmask the continuation left to right,
  log p = Σ_i log p(x_i | context, x_{<i}, masked x_{>=i}).  That is the exact log-likelihood of a
  proper distribution (left-to-right decoding of the diffusion model); the ELBO is the average of
  such chain-rule log-likelihoods over uniformly random orders, so `chain_order="random"` with n
  orders is a second unbiased estimator of the ELBO (used in the tests).

`Score.is_greedy` of a diffusion model decodes the masked continuation one token per step:
`greedy_order="confidence"` (default) commits the most confident masked position first (LLaDA's
low-confidence order), `greedy_order="l2r"` the leftmost masked position.  AR greedy decoding is
always left to right; AR scoring accepts and ignores the option.

Block-diffusion models (`block_size`): the ELBO decomposes over the blocks of context + continuation (blocks of
B tokens from the first scored position, as in training); every block holding continuation tokens is masked at
once in one [x_t | x_0] row under the block mask (a noisy block sees itself and the clean blocks before it), the
context given.  `method="mc"` draws, per sample and per block of m continuation tokens, k ~ U{1..m} (stratified
over the samples) and a uniform k-subset, the term being Σ_blocks m/k Σ_{i ∈ S} log p(x_i | ...); `Score.is_greedy`
runs the block sampler (one token per step, by confidence).  exact and chain are masked diffusion's only.

Noise is drawn from a generator seeded by (seed, the request's token ids), so a request's estimate
does not depend on what else is in the batch or in which order requests come.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_dataeff.errors import ConfigError
from megatron_dataeff.models.packed_sequences import packable, packed_forward
from megatron_dataeff.objectives.row_masks import RowMask

GREEDY_ORDERS = ("confidence", "l2r")


@dataclass
class Score:
    """Log-likelihood (or ELBO) of one continuation."""

    logprob: float  # nats, summed over the continuation's tokens
    stderr: float  # Monte-Carlo standard error (0 when exact)
    is_greedy: bool  # greedy decoding from the context would produce exactly the continuation
    num_tokens: int  # continuation tokens scored


def check_greedy_order(order: str) -> str:
    """`order` if it is one of GREEDY_ORDERS, else ValueError."""
    if order not in GREEDY_ORDERS:
        raise ValueError(f"greedy_order must be one of {', '.join(GREEDY_ORDERS)}, got {order!r}")
    return order


def _request_generator(seed: int, ids: Sequence[int], salt: str = "") -> torch.Generator:
    h = hashlib.sha256(f"{seed}|{salt}|".encode() + ",".join(map(str, ids)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


class ModelScorer:
    """Scores token sequences with an AR or masked-diffusion model."""

    def __init__(self, model, *, diffusion: bool, mask_token_id: int, max_length: int, eps: float = 1e-3,
                 tokenizer=None, device: str = "cpu", batch_size: int = 32, seed: int = 1234,
                 eod_token_id: Optional[int] = None, vocab_ids: Optional[int] = None, config=None,
                 metadata: Optional[dict] = None, block_size: Optional[int] = None):
        self.model = model
        self.diffusion = bool(diffusion)
        self.mask_token_id = int(mask_token_id)
        self.max_length = int(max_length)
        self.eps = float(eps)
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.eod_token_id = eod_token_id if eod_token_id is not None else (
            tokenizer.eod if tokenizer is not None else None)
        self.vocab_ids = vocab_ids
        self.config = config
        self.metadata = metadata or {}
        self.block_size = block_size  # a block-diffusion model's blocks (None: AR or masked diffusion)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, iteration: Optional[int] = None, device: str = "cpu",
                        batch_size: int = 32, seed: Optional[int] = None, view: Optional[str] = None
                        ) -> "ModelScorer":
        """A scorer for a `--save` directory (its latest checkpoint) or one `iter_N` directory; a dual
        checkpoint is scored as `view` ("ar" or "mdm")."""
        from megatron_dataeff.data.tokenizers import tokenizer_from_metadata
        from megatron_dataeff.inference.loading import load_model_for_inference
        from megatron_dataeff.objectives import objective_class

        model, cfg, meta = load_model_for_inference(path, iteration=iteration, device=device, view=view)
        tokenizer = tokenizer_from_metadata(meta["tokenizer"])
        return cls(model, diffusion=objective_class(cfg.objective).diffusion, mask_token_id=meta["mask_token_id"],
                   max_length=cfg.model.seq_length, eps=cfg.objective.mdm_eps, tokenizer=tokenizer,
                   device=device, batch_size=batch_size, seed=cfg.optim.seed if seed is None else seed,
                   vocab_ids=meta["vocab_ids"], config=cfg, metadata=meta, block_size=cfg.objective.block_size)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                  attention_mask: Optional[torch.Tensor] = None, row_mask: Optional[RowMask] = None) -> torch.Tensor:
        """[b, s] ids -> [b, s, vocab] float32 log-probabilities (batched by `batch_size`); `position_ids` [b, s],
        `attention_mask` [b, 1, s, s] (True = masked out) and `row_mask` (its compact form) as an ObjectiveBatch
        carries them, or None.  A model built for packed sequences (transformer-engine's THD) takes documents as
        the trainer hands them (models/packed_sequences.py), so it needs the row mask where there is a mask."""
        inner = self.model  # the GPTModel inside its wrappers (bf16's Float16Module), or any callable
        while not hasattr(inner, "attention_choice") and hasattr(inner, "module"):
            inner = inner.module
        choice = getattr(inner, "attention_choice", None)
        packed = choice is not None and choice.packed and attention_mask is not None
        if packed and not packable(row_mask):
            raise ValueError("this model takes packed documents (transformer-engine's THD): score it with the "
                             "batch's row mask (a document mask with one causality for all rows)")
        out = []
        for start in range(0, input_ids.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            x = input_ids[rows].to(self.device)
            b, s = x.shape
            pos = position_ids[rows].to(self.device) if position_ids is not None else \
                torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
            if packed:
                part = RowMask(row_mask.causal, row_mask.documents[rows].to(self.device))
                logits = packed_forward(self.model, x, pos, part)
            else:
                mask = attention_mask[rows].to(self.device) if attention_mask is not None else None
                logits = self.model(x, pos, mask)
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out, 0)

    @torch.no_grad()
    def logits_fn(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] -> [b, s, vocab] raw logits (for the samplers), padding rows set to -inf."""
        x = input_ids.to(self.device)
        b, s = x.shape
        pos = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        return self.mask_padding(self.model(x, pos, None).float())

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of the padded vocabulary rows (ids >= vocab_ids) to -inf, in place; returns them."""
        if self.vocab_ids is not None and logits.shape[-1] > self.vocab_ids:
            logits[..., self.vocab_ids:] = float("-inf")
        return logits

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this scorer has no tokenizer; pass token ids")
        return list(self.tokenizer.tokenize(text))

    # ------------------------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int], extra: int) -> tuple[list[int], list[int]]:
        """Left-truncate the context so that context + continuation (+ extra) fits the model."""
        if not continuation:
            raise ValueError("empty continuation")
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens does not fit the model's "
                             f"{self.max_length}-token window")
        keep = self.max_length + extra - len(continuation)
        return context[len(context) - keep:] if len(context) > keep else context, continuation

    def score(self, context: Sequence[int], continuation: Sequence[int], *, method: str = "mc",
              mc_samples: int = 32, greedy: bool = True, chain_order: str = "l2r",
              greedy_order: str = "confidence") -> Score:
        """Score one continuation (token ids) given its context (token ids)."""
        return self.score_many([(list(context), list(continuation))], method=method, mc_samples=mc_samples,
                               greedy=greedy, chain_order=chain_order, greedy_order=greedy_order)[0]

    def score_many(self, pairs: Sequence[tuple[list[int], list[int]]], *, method: str = "mc",
                   mc_samples: int = 32, greedy: bool = True, chain_order: str = "l2r",
                   greedy_order: str = "confidence") -> list[Score]:
        """Scores of (context ids, continuation ids) pairs, in order."""
        check_greedy_order(greedy_order)
        if not self.diffusion:
            return self._ar_scores(pairs)
        out = []
        for ctx, cont in pairs:
            ctx, cont = self._fit(list(ctx), list(cont), extra=0)
            if self.block_size is not None:
                if method != "mc":
                    raise ConfigError(f"--method {method}: a block-diffusion model is scored by its Monte-Carlo ELBO "
                                      f"(--method mc)")
                lp, se = self._block_mc(ctx, cont, mc_samples)
                out.append(Score(lp, se, self._block_greedy(ctx, cont) if greedy else False, len(cont)))
                continue
            if method == "mc":
                lp, se = self._mdm_mc(ctx, cont, mc_samples)
            elif method == "exact":
                lp, se = self._mdm_exact(ctx, cont), 0.0
            elif method == "chain":
                lp, se = self._mdm_chain(ctx, cont, chain_order, mc_samples)
            else:
                raise ValueError(f"method must be mc, exact or chain, got {method!r}")
            out.append(Score(lp, se, self._mdm_greedy(ctx, cont, greedy_order) if greedy else False, len(cont)))
        return out

    # ------------------------------------------------------------------------------------------
    def _ar_scores(self, pairs) -> list[Score]:
        items = []
        for ctx, cont in pairs:
            ctx = list(ctx)
            if not ctx:
                if self.eod_token_id is None:
                    raise ValueError("AR scoring of an empty context needs an EOD token to condition on")
                ctx = [self.eod_token_id]
            ctx, cont = self._fit(ctx, list(cont), extra=1)
            items.append((ctx, cont))
        results: list[Optional[Score]] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs = [items[i][0] + items[i][1] for i in chunk]
            width = max(len(s) for s in seqs) - 1
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, s in enumerate(seqs):
                x[r, :len(s) - 1] = torch.tensor(s[:-1])  # right padding: causal, never seen
            lp = self.log_probs(x)
            for r, i in enumerate(chunk):
                ctx, cont = items[i]
                n, L = len(ctx) + len(cont), len(cont)
                rows = lp[r, n - 1 - L:n - 1]
                target = torch.tensor(cont)
                tok = rows.gather(-1, target[:, None])[:, 0]
                results[i] = Score(float(tok.double().sum()), 0.0, bool((rows.argmax(-1) == target).all()), L)
        return results  # type: ignore[return-value]

    def _masked_logprob(self, ctx: list[int], cont: list[int], masks: torch.Tensor) -> torch.Tensor:
        """[n] sum of log p(x_i) over masked continuation positions, for masks [n, L] bool."""
        n, L = masks.shape
        base = torch.tensor(ctx + cont, dtype=torch.long)
        x = base.unsqueeze(0).repeat(n, 1)
        c = len(ctx)
        x[:, c:] = torch.where(masks, torch.full_like(x[:, c:], self.mask_token_id), x[:, c:])
        lp = self.log_probs(x)[:, c:]  # [n, L, V]
        tok = lp.gather(-1, torch.tensor(cont)[None, :, None].expand(n, L, 1))[..., 0]
        return (tok.double() * masks.double()).sum(-1)

    def _block_rows(self, seq: torch.Tensor, noisy: torch.Tensor):
        """The training form of sequences: ([n, 2s] ids [noisy | clean], [n, 2s] positions, [n, 1, 2s, 2s] mask)."""
        n, s = noisy.shape
        ids = torch.cat([noisy, seq.expand(n, s)], 1)
        pos = torch.arange(s).repeat(2)[None].expand(n, -1)
        mask = RowMask(False, rows=1, seq=2 * s, block_size=self.block_size, device="cpu").dense().expand(n, -1, -1, -1)
        return ids, pos, mask

    def _block_mc(self, ctx, cont, mc_samples: int) -> tuple[float, float]:
        c, L, B = len(ctx), len(cont), self.block_size
        n = int(mc_samples)
        if n < 1:
            raise ConfigError(f"--mc-samples must be >= 1, got {mc_samples}")
        seq = torch.tensor(ctx + cont, dtype=torch.long)[None]
        g = _request_generator(self.seed, ctx + [-1] + cont, "block-mc")
        masks = torch.zeros(n, L, dtype=torch.bool)
        scale = torch.zeros(n, L, dtype=torch.float64)  # m / k of the position's block, on its masked positions
        for b in range(c // B, (c + L - 1) // B + 1):
            lo, hi = max(c, b * B) - c, min(c + L, (b + 1) * B) - c  # the block's continuation positions
            m = hi - lo
            u = float(torch.rand((), generator=g))
            k = torch.clamp(torch.floor((torch.arange(n, dtype=torch.float64) + u) * m / n).long() + 1, 1, m)
            rank = torch.rand(n, m, generator=g).argsort(-1).argsort(-1)
            chosen = rank < k[:, None]
            masks[:, lo:hi] = chosen
            scale[:, lo:hi] = (m / k.double())[:, None] * chosen
        noisy = seq.expand(n, -1).clone()
        noisy[:, c:] = torch.where(masks, torch.full_like(noisy[:, c:], self.mask_token_id), noisy[:, c:])
        ids, pos, mask = self._block_rows(seq, noisy)
        lp = self.log_probs(ids, pos, mask)[:, c:c + L]
        tok = lp.gather(-1, torch.tensor(cont)[None, :, None].expand(n, L, 1))[..., 0].double()
        terms = (tok * scale).sum(-1)
        se = float(terms.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
        return float(terms.mean()), se

    @torch.no_grad()
    def _block_greedy(self, ctx, cont) -> bool:
        """Would the block sampler (greedy, one token per step, most confident first) produce exactly `cont`?"""
        c, L = len(ctx), len(cont)
        x = torch.tensor(ctx + [self.mask_token_id] * L, dtype=torch.long)[None]
        B = self.block_size
        for b in range(c // B, (c + L - 1) // B + 1):
            start, end = max(c, b * B), min(c + L, (b + 1) * B)
            for _ in range(end - start):
                ids, pos, mask = self._block_rows(x[:, :end], x[:, :end])
                logits = self.mask_padding(self.model(ids.to(self.device), pos.to(self.device),
                                                      mask.to(self.device)).float())[0, start:end]
                logits[:, self.mask_token_id] = float("-inf")
                prob, pred = logits.softmax(-1).max(-1)
                masked = x[0, start:end] == self.mask_token_id
                j = int(torch.where(masked, prob, torch.full_like(prob, -1.0)).argmax())
                if int(pred[j]) != cont[start + j - c]:
                    return False
                x[0, start + j] = pred[j]
        return True

    def _mdm_mc(self, ctx, cont, mc_samples: int) -> tuple[float, float]:
        L = len(cont)
        n = 1 if L == 1 else int(mc_samples)
        if n < 1:
            raise ConfigError(f"--mc-samples must be >= 1, got {mc_samples}")
        g = _request_generator(self.seed, ctx + [-1] + cont, "mc")
        u = float(torch.rand((), generator=g))
        k = torch.clamp(torch.floor((torch.arange(n, dtype=torch.float64) + u) * L / n).long() + 1, 1, L)
        scores = torch.rand(n, L, generator=g)
        rank = scores.argsort(-1).argsort(-1)  # a uniform random permutation per sample
        masks = rank < k[:, None]
        terms = self._masked_logprob(ctx, cont, masks) * (L / k.double())
        mean = float(terms.mean())
        se = float(terms.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
        return mean, se

    def _mdm_exact(self, ctx, cont) -> float:
        L = len(cont)
        if L > 12:
            raise ConfigError(f"--method exact enumerates 2^L masked sets; an answer of L = {L} tokens is too long "
                              f"(use --method mc)")
        total = 0.0
        for k in range(1, L + 1):
            subsets = list(itertools.combinations(range(L), k))
            masks = torch.zeros(len(subsets), L, dtype=torch.bool)
            for r, s in enumerate(subsets):
                masks[r, list(s)] = True
            total += float(self._masked_logprob(ctx, cont, masks).mean()) / k
        return total

    def _mdm_chain(self, ctx, cont, order: str, num_orders: int) -> tuple[float, float]:
        L = len(cont)
        if order == "l2r":
            orders = [torch.arange(L)]
        elif order == "random":
            g = _request_generator(self.seed, ctx + [-1] + cont, "chain")
            orders = [torch.randperm(L, generator=g) for _ in range(max(1, num_orders))]
        else:
            raise ValueError(f"chain_order must be l2r or random, got {order!r}")
        values = []
        for perm in orders:
            # step j reveals perm[:j] and scores perm[j]: mask = positions not yet revealed
            rank = torch.empty(L, dtype=torch.long)
            rank[perm] = torch.arange(L)
            masks = rank[None, :] >= torch.arange(L)[:, None]  # [L steps, L]
            target_only = rank[None, :] == torch.arange(L)[:, None]
            base = torch.tensor(ctx + cont, dtype=torch.long)
            x = base.unsqueeze(0).repeat(L, 1)
            c = len(ctx)
            x[:, c:] = torch.where(masks, torch.full_like(x[:, c:], self.mask_token_id), x[:, c:])
            lp = self.log_probs(x)[:, c:]
            tok = lp.gather(-1, torch.tensor(cont)[None, :, None].expand(L, L, 1))[..., 0]
            values.append(float((tok.double() * target_only.double()).sum()))
        v = torch.tensor(values, dtype=torch.float64)
        se = float(v.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        return float(v.mean()), se

    @torch.no_grad()
    def _mdm_greedy(self, ctx, cont, order: str = "confidence") -> bool:
        """Would greedy decoding, one token per step in `order` (GREEDY_ORDERS), produce exactly `cont`?"""
        L, c = len(cont), len(ctx)
        x = torch.tensor(ctx + [self.mask_token_id] * L, dtype=torch.long)[None]
        target = torch.tensor(cont)
        for step in range(L):
            logits = self.logits_fn(x)[0, c:]
            logits[:, self.mask_token_id] = float("-inf")
            prob, pred = logits.softmax(-1).max(-1)
            masked = x[0, c:] == self.mask_token_id
            prob = torch.where(masked, prob, torch.full_like(prob, -1.0))
            j = step if order == "l2r" else int(prob.argmax())  # l2r: positions < step are committed
            if int(pred[j]) != int(target[j]):
                return False
            x[0, c + j] = pred[j]
        return True
