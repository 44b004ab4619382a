"""Token-dropout corruptions beyond independent [MASK] replacement: what replaces a dropped token (the mask
token, a random vocabulary token, or BERT's 80/10/10 mix) and which tokens are dropped (independent
positions or geometric spans).  Keyed per sample like `ops.masking`, so every layout, micro-batch split
and resume corrupts a sample the same way.

Per sample i with drop probability p (a float32, from `sample_rates` or given per sample):

    which positions (`span` = None): dropped[i, j] = u_token[j] < p           (exactly `mask_tokens`)
    which positions (`span` = L):    a two-state Markov chain over j with stationary dropped fraction p and
        mean dropped-run length L_p = max(L, p / (1 - p)) (longer only where p needs it):
            dropped[i, 0] = u_token[0] < p
            dropped[i, j] = u_token[j] >= 1 / L_p          if dropped[i, j-1]   (stay: 1 - 1/L_p)
                            u_token[j] < p / (L_p (1 - p))  otherwise           (enter)
        (p = 1: every position; all thresholds are float32 per sample)
    what replaces it: noise "mask": mask_token_id; "random": a uniform id of [0, vocab_ids) other than the
        mask token, floor(u_id[j] * (vocab_ids - 1)) shifted past mask_token_id; "mixed" (BERT):
        u_kind[j] < 0.8 -> mask token, < 0.9 -> random id, else the token is kept (still counted dropped).

u_token is the STREAM_TOKEN stream of `mask_tokens`; u_id and u_kind are STREAM_NOISE_ID and
STREAM_NOISE_KIND.  The C++/CUDA kernels cover the independent [MASK] case (`mask_tokens`); spans and
random / mixed noise run this torch code (`corruption_implementation` says which a configuration gets).
"""

from __future__ import annotations

import torch

from megatron_dataeff.ops import extension, philox
from megatron_dataeff.ops.masking import MaskedTokens, mask_tokens, sample_rates

NOISES = ("mask", "random", "mixed")
MIXED_MASK, MIXED_RANDOM = 0.8, 0.9  # BERT: 80% [MASK], 10% random, 10% unchanged


def corruption_implementation(device, noise: str = "mask", span: float | None = None) -> str:
    """What corrupts the inputs on `device`: the fused kernel ("cpp" / "cuda") for independent [MASK]
    replacement, else "torch" with the reason."""
    if noise == "mask" and span is None:
        return extension.implementation(device)
    why = [f"--token-dropout-noise {noise}"] if noise != "mask" else []
    why += [f"--token-dropout-span {span:g}"] if span is not None else []
    return f"torch ({' and '.join(why)} have no fused kernel)"


def span_mask(u: torch.Tensor, p: torch.Tensor, span: float) -> torch.Tensor:
    """[b, s] bool: the Markov chain of the module docstring, from uniforms u [b, s] and rates p [b] (float32).

    Vectorised: each step is a map of the previous state that is a constant (stay-and-enter agree), the
    identity or a negation, so the state at j is the value of the last constant step k <= j, flipped by the
    parity of the negations after k (position 0 is a constant: u < p)."""
    b, s = u.shape
    p64 = p.double()
    run = torch.clamp(torch.where(p64 < 1, p64 / (1 - p64).clamp_min(1e-30), torch.full_like(p64, float("inf"))),
                      min=float(span))
    leave = torch.where(torch.isinf(run), torch.zeros_like(run), 1.0 / run).float()[:, None]  # P(stop a run)
    enter = torch.where(torch.isinf(run), torch.ones_like(run), p64 / (run * (1 - p64).clamp_min(1e-30))
                        ).clamp(max=1.0).float()[:, None]  # P(start a run)
    stay_on = u >= leave  # next state if the previous was dropped
    turn_on = u < enter  # next state if the previous was kept
    const = stay_on == turn_on
    const[:, 0] = True
    value = torch.where(const, stay_on, torch.zeros_like(stay_on))
    value[:, 0] = u[:, 0] < p
    negate = (~stay_on) & turn_on
    negate[:, 0] = False
    pos = torch.arange(s).expand(b, s)
    last = torch.where(const, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    flips = negate.long().cumsum(dim=1)
    parity = (flips - flips.gather(1, last)) % 2
    return value.gather(1, last) ^ parity.bool()


def corrupt_tokens_reference(tokens: torch.Tensor, sample_index: torch.Tensor, seed: int, *, rates: torch.Tensor,
                             noise: str, span: float | None, mask_token_id: int, vocab_ids: int,
                             stream_offset: int = 0) -> MaskedTokens:
    """Corrupt tokens [b, s] with drop probabilities `rates` [b] (float32); see the module docstring."""
    device = tokens.device
    index = sample_index.to("cpu")
    b, s = tokens.shape
    p = rates.to("cpu", torch.float32)
    u = philox.uniform(seed, index, philox.STREAM_TOKEN + stream_offset, s)
    dropped = span_mask(u, p, span) if span is not None else u < p[:, None]
    replaced = torch.full((b, s), mask_token_id, dtype=tokens.dtype)
    if noise != "mask":
        u_id = philox.uniform(seed, index, philox.STREAM_NOISE_ID + stream_offset, s)
        ids = (u_id.double() * (vocab_ids - 1)).floor().long().clamp(max=vocab_ids - 2)
        ids = ids + (ids >= mask_token_id).long()  # skip the mask token
        if noise == "random":
            replaced = ids.to(tokens.dtype)
        else:
            kind = philox.uniform(seed, index, philox.STREAM_NOISE_KIND + stream_offset, s)
            keep = tokens.to("cpu")
            replaced = torch.where(kind < MIXED_MASK, replaced,
                                   torch.where(kind < MIXED_RANDOM, ids.to(tokens.dtype), keep))
    dropped, replaced = dropped.to(device), replaced.to(device)
    weight = torch.ones((b, s), dtype=torch.float32, device=device)
    return MaskedTokens(input_ids=torch.where(dropped, replaced, tokens), mask=dropped, weight=weight,
                        rate=p.to(device))


def corrupt_tokens(tokens: torch.Tensor, sample_index: torch.Tensor, seed: int, *, mode: str, rate: float,
                   noise: str = "mask", span: float | None = None, mask_token_id: int, vocab_ids: int,
                   stream_offset: int = 0) -> MaskedTokens:
    """Token dropout of tokens [b, s] of samples `sample_index` [b]: mode "fixed" (p = rate) or "uniform"
    (p = rate x u per sample), then `noise` / `span` as in the module docstring.  The independent [MASK] case
    is `mask_tokens` itself (the fused kernel where built); the others run the torch code."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if span is not None and span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if not 0 <= mask_token_id < vocab_ids or vocab_ids < 2:
        raise ValueError(f"need 0 <= mask_token_id < vocab_ids and vocab_ids >= 2, got {mask_token_id}, {vocab_ids}")
    if noise == "mask" and span is None:
        return mask_tokens(tokens, sample_index, seed, mode=mode, rate=rate, mask_token_id=mask_token_id,
                           stream_offset=stream_offset)
    if mode not in ("fixed", "uniform") or not 0.0 <= rate <= 1.0:
        raise ValueError(f"token dropout needs mode fixed or uniform and a rate in [0, 1], got {mode!r}, {rate}")
    rates = sample_rates(sample_index.to("cpu"), seed, mode=mode, rate=rate, stream_offset=stream_offset)
    return corrupt_tokens_reference(tokens, sample_index, seed, rates=rates, noise=noise, span=span,
                                    mask_token_id=mask_token_id, vocab_ids=vocab_ids, stream_offset=stream_offset)
