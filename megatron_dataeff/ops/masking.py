"""Token masking keyed per sample: which input tokens become the mask token, and their loss weights.

`mask_tokens` is the one entry point the objectives call.  It checks its arguments and runs the fused
C++/CUDA kernel of `csrc/` where it is built for the tokens' device (see `ops.extension`), else the
plain-torch reference below; the kernels match the reference bit for bit.  Every random number comes from the Philox stream of `ops/philox.py`, keyed by
(seed, global sample index), so a sample is corrupted the same way under any parallel layout,
micro-batch split or resume.

Per sample i (all rates are float32; double-precision intermediates are rounded once):
    u_rate = uniform(seed, index_i, STREAM_RATE)[0]
    t      = u_rate, or with stratification over groups of G samples
             float32((index_i % G + u_rate) / G)              # one sample per stratum of [0, 1)
    p      = mdm:     float32((rate - eps) * t + eps)             # rate 1 (default); < 1: a clipped schedule
             fixed:   float32(rate)
             uniform: float32(rate * t)
Per token j:
    masked[i, j] = uniform(seed, index_i, STREAM_TOKEN)[j] < p
    input[i, j]  = mask_token_id if masked else tokens[i, j]
    weight[i, j] = float32(1 / p) if masked else 0            # mdm's 1/p loss weight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dataeff.ops import extension, philox

MODES = ("mdm", "fixed", "uniform")


@dataclass
class MaskedTokens:
    """The result of `mask_tokens`."""

    input_ids: torch.Tensor  # [batch, seq], dtype of the tokens, mask_token_id where masked
    mask: torch.Tensor  # [batch, seq] bool, True where masked
    weight: torch.Tensor  # [batch, seq] float32, 1/p where masked, else 0
    rate: torch.Tensor  # [batch] float32, the masking probability p of each sample


def _check(tokens, sample_index, mode, rate, eps, mask_token_id, stratify_group, stream_offset=0):
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be int32 or int64, got {tokens.dtype}")
    if sample_index.dim() != 1 or sample_index.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"sample_index must be [batch]={tokens.shape[0]}, got shape {tuple(sample_index.shape)}"
        )
    if sample_index.dtype != torch.int64:
        raise TypeError(f"sample_index must be int64, got {sample_index.dtype}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if mode == "mdm" and not eps < rate:
        raise ValueError(f"mdm rates lie in [eps, rate): eps {eps} must be below rate {rate}")
    if mask_token_id < 0:
        raise ValueError(f"mask_token_id must be >= 0, got {mask_token_id}")
    if stratify_group < 0:
        raise ValueError(f"stratify_group must be >= 0, got {stratify_group}")
    if not 0 <= stream_offset <= 2**32 - 1 - philox.STREAM_STRATA:
        raise ValueError(f"stream_offset must be in [0, 2**32 - {1 + philox.STREAM_STRATA}], got {stream_offset}")


def sample_rates(
    sample_index: torch.Tensor,
    seed: int,
    *,
    mode: str,
    rate: float = 1.0,
    eps: float = 1e-3,
    stratify_group: int = 0,
    stream_offset: int = 0,
    columns: int = 1,
) -> torch.Tensor:
    """[batch] float32 masking probability p of each sample (see the module docstring); with `columns` > 1,
    [batch, columns]: that many rates per sample from its rate stream (block diffusion's blocks), the first being
    the sample's own rate."""
    n = sample_index.shape[0]
    if mode == "fixed":
        p = torch.full((n, columns), rate, dtype=torch.float32)
        return p[:, 0] if columns == 1 else p
    u = philox.uniform(seed, sample_index, philox.STREAM_RATE + stream_offset, columns)
    t = u.double()
    if stratify_group > 0:
        t = ((sample_index % stratify_group).double()[:, None] + t) / stratify_group
        t = t.float().double()  # t is a float32 value, as in the kernels
    if mode == "mdm":
        p = (rate - eps) * t + eps
    else:
        p = rate * t
    p = p.float()
    return p[:, 0] if columns == 1 else p


def mask_tokens_reference(
    tokens: torch.Tensor,
    sample_index: torch.Tensor,
    seed: int,
    *,
    mode: str,
    mask_token_id: int,
    rate: float = 1.0,
    eps: float = 1e-3,
    stratify_group: int = 0,
    stream_offset: int = 0,
) -> MaskedTokens:
    """The plain-torch definition of `mask_tokens` (CPU arithmetic, results on tokens' device)."""
    device = tokens.device
    index = sample_index.to("cpu")
    b, s = tokens.shape
    p = sample_rates(
        index, seed, mode=mode, rate=rate, eps=eps, stratify_group=stratify_group,
        stream_offset=stream_offset,
    )
    u = philox.uniform(seed, index, philox.STREAM_TOKEN + stream_offset, s) if b else (
        torch.empty((0, s), dtype=torch.float32)
    )
    mask = u < p[:, None]
    weight = torch.where(mask, (1.0 / p)[:, None], torch.zeros((), dtype=torch.float32))
    mask, weight, p = mask.to(device), weight.to(device), p.to(device)
    input_ids = torch.where(mask, torch.tensor(mask_token_id, dtype=tokens.dtype, device=device), tokens)
    return MaskedTokens(input_ids=input_ids, mask=mask, weight=weight, rate=p)


def mask_tokens(
    tokens: torch.Tensor,
    sample_index: torch.Tensor,
    seed: int,
    *,
    mode: str,
    mask_token_id: int,
    rate: float = 1.0,
    eps: float = 1e-3,
    stratify_group: int = 0,
    stream_offset: int = 0,
) -> MaskedTokens:
    """Mask tokens [batch, seq] of the samples `sample_index` [batch] (int64) with seed `seed`.

    mode: "mdm" (t ~ U(0,1), p = (rate - eps) t + eps: rate 1, or below for a clipped schedule), "fixed"
    (p = rate) or "uniform" (p = rate * t).
    stratify_group: G > 0 draws t stratified over groups of G consecutive sample indices.
    stream_offset: 0 for training noise, `philox.EVAL_STREAM_OFFSET` for evaluation noise.
    """
    _check(tokens, sample_index, mode, rate, eps, mask_token_id, stratify_group, stream_offset)
    impl = extension.implementation(tokens.device)
    if impl == "torch":
        return mask_tokens_reference(
            tokens, sample_index, seed, mode=mode, mask_token_id=mask_token_id, rate=rate, eps=eps,
            stratify_group=stratify_group, stream_offset=stream_offset,
        )
    k0, k1 = philox.seed_key(seed)
    args = (k0, k1, MODES.index(mode), float(rate), float(eps), int(mask_token_id), int(stratify_group),
            int(stream_offset))
    if impl == "cpp":  # the kernel checks that the indices are non-negative
        ids, mask, weight, p = extension.cpu_module().mask_tokens(tokens, sample_index.to("cpu"), *args)
    else:
        if tokens.shape[0] and bool((sample_index < 0).any()):  # a sync when the indices live on the GPU
            raise ValueError("stream indices must be non-negative")
        index = sample_index.to(tokens.device, non_blocking=True)
        with torch.cuda.device(tokens.device):
            ids, mask, weight, p = extension.cuda_module().mask_tokens(
                tokens, index, *args, extension.cuda_stream(tokens.device))
    return MaskedTokens(input_ids=ids, mask=mask, weight=weight, rate=p)
