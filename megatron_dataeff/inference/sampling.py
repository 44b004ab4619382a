"""Sampling from any logits callable: AR decoding, and the masked-diffusion sampler.

`diffusion_generate` lives in the standalone modeling file that diffusion exports carry, and is
re-exported here, so a megatron model (tools/generate.py) and an exported HF model run the same
code and give the same tokens for the same seed.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from megatron_dataeff.export.modeling_dataeff_mdm import (BlockRecompute, block_diffusion_generate,  # noqa: F401
                                                          diffusion_generate)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """[batch, vocab] logits with everything outside the top-k / nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def ar_generate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    eos_token_id: Optional[int] = None,
    suppress_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Left-to-right decoding; returns [batch, prompt + new] ids (prompt included).

    Each step calls `logits_fn(ids) -> [batch, seq or 1, vocab]` with the whole sequence so far and
    takes the last position (a stateful `logits_fn` such as `kv_cache.KVCacheLogits` runs only the
    positions it has not seen): argmax at temperature 0, else a sample from softmax(logits / T)
    restricted to the top-k / top-p set, drawn with `generator`.  `suppress_ids` are never produced.
    A sequence stops at `eos_token_id` (later positions repeat it); the loop ends when all have.
    """
    x = torch.as_tensor(prompt_ids, dtype=torch.long)
    if x.dim() == 1:
        x = x[None, :]
    banned = torch.tensor(sorted(set(int(i) for i in suppress_ids)), dtype=torch.long)
    finished = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(max_new_tokens):
        logits = logits_fn(x)[:, -1].float()
        if banned.numel():
            logits[:, banned.to(logits.device)] = float("-inf")
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            logits = _filter_top_k_top_p(logits / temperature, top_k, top_p)
            probs = logits.softmax(-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(x.device)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        x = torch.cat([x, nxt[:, None]], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
    return x
