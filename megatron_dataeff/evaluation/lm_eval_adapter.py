"""lm-evaluation-harness (0.4.x) model `megatron_dataeff`: AR and masked-diffusion checkpoints.

    python tools/run_lm_eval.py --model megatron_dataeff --model_args load=runs/mdm/checkpoints,mc_samples=32 \
        --tasks hellaswag,piqa --batch_size 16

model_args: `load` (a --save directory or iter_N directory), `iteration`, `mc_samples` (diffusion
answer ELBO samples, default 32; single-token answers use 1), `method` (mc | exact | chain),
`greedy_order` (confidence | l2r: diffusion `is_greedy` decoding order, default confidence),
`batch_size`, `seed`, `device`, `gen_steps` / `gen_block_length` (diffusion sampler; default one
token per step, one block), `view` (ar | mdm: how a dual-objective checkpoint is scored).

* loglikelihood: AR = exact log p(continuation | context) and greedy check; diffusion = the ELBO of
  the continuation with only it masked (see `scoring.py`), greedy = decoding one token per step
  (most confident position first, or left to right with greedy_order=l2r) reproduces it.
* loglikelihood_rolling: AR = lm-eval's rolling windows (each token predicted once, maximal
  context); diffusion = the ELBO of each disjoint window of the text given the text before it
  (windows of max_length / 2 tokens, the rest of the model window is context).
* generate_until: AR = greedy decoding; diffusion = `diffusion_generate` (prompt + masks,
  low-confidence remasking); both cut at the first stop string.

The class works without lm_eval installed (`MegatronDataEffLM` then derives from `object`), so its
methods can be driven with any objects that have `.args`; `register()` registers it with lm_eval.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_dataeff.errors import ConfigError
from megatron_dataeff.evaluation.scoring import ModelScorer, check_greedy_order
from megatron_dataeff.inference.kv_cache import KVCacheLogits

try:  # lm-eval is optional: the adapter's methods work on any objects with `.args`
    from lm_eval.api.model import LM as _LMBase

    LM_EVAL_AVAILABLE = True
except Exception:  # pragma: no cover - exercised only without lm_eval
    _LMBase = object
    LM_EVAL_AVAILABLE = False

MODEL_NAME = "megatron_dataeff"


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


class MegatronDataEffLM(_LMBase):
    """An lm-eval `LM` over a megatron_dataeff checkpoint (or an existing `ModelScorer`)."""

    def __init__(self, load: Optional[str] = None, iteration=None, mc_samples=32, method: str = "mc",
                 batch_size=16, seed=None, device: str = "cpu", gen_steps=None, gen_block_length=None,
                 scorer=None, max_gen_toks=None, greedy_order: str = "confidence", view=None, **kwargs):
        if _LMBase is not object:
            super().__init__()
        self.greedy_order = check_greedy_order(str(greedy_order))
        if scorer is None:
            if load is None:
                raise ConfigError("--model_args needs load=<checkpoint directory>")
        bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        device = str(device or "cpu").split(":")[0]
        if device == "cuda":
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval defaults to cuda:0
        if scorer is None:
            scorer = ModelScorer.from_checkpoint(load, iteration=None if iteration is None else int(iteration),
                                                 device=device, batch_size=bs,
                                                 seed=None if seed is None else int(seed), view=view)
        self.scorer = scorer
        self.mc_samples = int(mc_samples)
        self.method = method
        self.gen_steps = None if gen_steps is None else int(gen_steps)
        self.gen_block_length = None if gen_block_length is None else int(gen_block_length)
        self.max_gen_toks = 32 if max_gen_toks is None else int(max_gen_toks)

    # lm-eval calls these for bookkeeping
    @property
    def tokenizer_name(self) -> str:
        return str(self.scorer.metadata.get("tokenizer", {}).get("tokenizer_type", "megatron_dataeff"))

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def _encode(self, text: str) -> list[int]:
        return self.scorer.encode(text)

    # ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            # lm-eval convention: a word-boundary space at the end of the context moves to the continuation
            n_spaces = len(context) - len(context.rstrip(" "))
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            pairs.append((self._encode(context), self._encode(continuation)))
        out = []
        for ctx, cont in pairs:
            s = self.scorer.score(ctx, cont, method=self.method, mc_samples=self.mc_samples, greedy=True,
                                  greedy_order=self.greedy_order)
            out.append((s.logprob, s.is_greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = self._encode(req.args[0])
            out.append(self._rolling(ids))
        return out

    def _rolling(self, ids: list[int]) -> float:
        sc = self.scorer
        if not ids:
            return 0.0
        total = 0.0
        if not sc.diffusion:
            # windows of max_length predictions, each token predicted once, maximal context
            prefix = [sc.eod_token_id] if sc.eod_token_id is not None else []
            seq = prefix + ids
            pos = 1  # the first token needs something to condition on: EOD, else it is not scored
            pairs = []
            while pos < len(seq):
                end = min(len(seq), pos + sc.max_length)
                ctx_start = max(0, end - sc.max_length - 1)
                pairs.append((seq[ctx_start:pos], seq[pos:end]))
                pos = end
            for s in sc.score_many(pairs):
                total += s.logprob
            return total
        chunk = max(1, sc.max_length // 2)
        for pos in range(0, len(ids), chunk):
            cont = ids[pos:pos + chunk]
            ctx = ids[max(0, pos - (sc.max_length - len(cont))):pos]
            method = "mc" if self.method == "exact" or sc.block_size is not None else self.method
            total += sc.score(ctx, cont, method=method,
                              mc_samples=self.mc_samples, greedy=False).logprob
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            n_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
            text = self.generate(context, n_new, temperature)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out

    def generate(self, context: str, max_new_tokens: int, temperature: float = 0.0) -> str:
        """Continue `context` by up to max_new_tokens tokens (greedy at temperature 0)."""
        # here, not at the top: the samplers come with the diffusion modeling file, which needs transformers (the
        # `hf` extra); scoring does not
        from megatron_dataeff.inference.sampling import (BlockRecompute, ar_generate, block_diffusion_generate,
                                                         diffusion_generate)

        sc = self.scorer
        n_new = max(1, min(int(max_new_tokens), sc.max_length - 1))
        ids = self._encode(context)
        if not ids and sc.eod_token_id is not None:
            ids = [sc.eod_token_id]
        ids = ids[-(sc.max_length - n_new):] if len(ids) > sc.max_length - n_new else ids
        g = torch.Generator().manual_seed(sc.seed)
        suppress = [sc.mask_token_id]
        if sc.block_size is not None:  # block diffusion: the model's own blocks, one token per step by default

            def block_logits(x, position_ids, keep):
                mask = ~keep[None, None].expand(x.shape[0], 1, -1, -1)  # megatron's convention: True = masked out
                return sc.mask_padding(sc.model(x.to(sc.device), position_ids.to(sc.device),
                                                mask.to(sc.device)).float())

            out = block_diffusion_generate(BlockRecompute(block_logits, sc.block_size), torch.tensor([ids]), n_new,
                                           sc.block_size, self.gen_steps, temperature, sc.mask_token_id, g,
                                           suppress_ids=suppress)
        elif sc.diffusion:
            block = self.gen_block_length or n_new
            if n_new % block:
                n_new = (n_new // block + 1) * block
                ids = ids[-(sc.max_length - n_new):]
            steps = self.gen_steps or n_new
            num_blocks = n_new // block
            steps = max(num_blocks, steps // num_blocks * num_blocks)
            out = diffusion_generate(sc.logits_fn, torch.tensor([ids]), gen_length=n_new, block_length=block,
                                     steps=steps, temperature=temperature, mask_token_id=sc.mask_token_id,
                                     generator=g, suppress_ids=suppress)
        else:
            out = ar_generate(self._cached_logits_fn(len(ids) + n_new), torch.tensor([ids]), max_new_tokens=n_new,
                              temperature=temperature, generator=g, eos_token_id=sc.eod_token_id,
                              suppress_ids=suppress)
        new = [int(t) for t in out[0, len(ids):].tolist()]
        if sc.eod_token_id is not None and sc.eod_token_id in new:
            new = new[:new.index(sc.eod_token_id)]
        return sc.tokenizer.detokenize(new)

    def _cached_logits_fn(self, max_length: int):
        """sc.logits_fn's contract (float32, padding rows -inf) decoded with a KV cache (inference/kv_cache.py)
        when the model is a megatron-core GPTModel; any other model recomputes the sequence each step."""
        from megatron.core.models.gpt import GPTModel

        sc = self.scorer
        if not isinstance(sc.model, GPTModel):
            return sc.logits_fn
        cache = KVCacheLogits(sc.model, max_length)
        return lambda input_ids: sc.mask_padding(cache(input_ids).float())


def register() -> type:
    """Register `MegatronDataEffLM` with lm-eval as `megatron_dataeff` (idempotent); returns the class."""
    if not LM_EVAL_AVAILABLE:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'lm_eval>=0.4,<0.5'")
    from lm_eval.api import registry

    try:  # lm-eval fills its registry lazily only while it is empty; fill it first so `hf` etc. stay
        import lm_eval.models  # noqa: F401
    except Exception:
        pass
    try:
        known = MODEL_NAME in registry.MODEL_REGISTRY
    except TypeError:
        known = False
    if not known:
        registry.register_model(MODEL_NAME)(MegatronDataEffLM)
    return MegatronDataEffLM
