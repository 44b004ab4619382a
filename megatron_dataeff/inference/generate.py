"""Text from a checkpoint: AR decoding with a KV cache, or the masked-diffusion sampler.

AR models decode left to right (greedy at temperature 0, otherwise temperature with optional top-k /
top-p) with megatron-core's static KV cache (`kv_cache=False` recomputes the whole sequence each step:
same greedy tokens) and stop at the tokenizer's end-of-document token.  Masked-diffusion models run the
sampler of the exported HF modeling file (`diffusion_generate`), so the same seed gives the same tokens
as the exported model's `generate`.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_dataeff.data.tokenizers import tokenizer_from_metadata
from megatron_dataeff.errors import ConfigError, UserError
from megatron_dataeff.inference.kv_cache import KVCacheLogits
from megatron_dataeff.inference.loading import load_model_for_inference
from megatron_dataeff.inference.sampling import (BlockRecompute, ar_generate, block_diffusion_generate,
                                                 diffusion_generate)
from megatron_dataeff.objectives import objective_class


def generate_text(load: str, prompt: str, max_new_tokens: int, *, iteration: Optional[int] = None,
                  temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: int = 1234, steps: Optional[int] = None, block_length: Optional[int] = None,
                  kv_cache: bool = True, device: str = "cpu", view: Optional[str] = None) -> dict:
    """{"text", "token_ids"}: the continuation of `prompt` (ids without the prompt; text up to EOD); a dual-
    objective checkpoint generates as `view` ("ar" or "mdm")."""
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    model, cfg, meta = load_model_for_inference(load, iteration, device=device, view=view)
    diffusion = objective_class(cfg.objective).diffusion
    block_size = cfg.objective.block_size  # block diffusion: generated block by block
    if block_size is not None:
        if block_length is not None and block_length != block_size:
            raise ConfigError(f"--block-length {block_length}: this model was trained with --block-size {block_size}")
        if steps is not None and steps <= 0:
            raise ConfigError(f"--steps must be positive, got {steps}")
    elif diffusion:
        _check_diffusion_args(max_new_tokens, block_length, steps)
    tokenizer = tokenizer_from_metadata(meta["tokenizer"])
    eod = meta["tokenizer"].get("eod")  # None: a tokenizer without EOS/SEP; AR then runs to the end
    ids = torch.tensor([tokenizer.tokenize(prompt)], dtype=torch.long)
    if ids.shape[1] == 0:
        raise UserError("--prompt encodes to no tokens")
    dev = next(model.parameters()).device
    rows = model.embedding.word_embeddings.weight.shape[0]
    padding = range(meta["vocab_ids"], rows)
    generator = torch.Generator().manual_seed(seed)

    def logits_fn(x):
        x = x.to(dev)
        pos = torch.arange(x.shape[1], device=dev)[None, :].expand(x.shape[0], -1)
        return model(x, pos, None)

    def block_logits_fn(x, position_ids, keep):
        mask = ~keep.to(dev)[None, None].expand(x.shape[0], 1, -1, -1)  # megatron's convention: True = masked out
        return model(x.to(dev), position_ids.to(dev), mask)

    if block_size is not None:
        out = block_diffusion_generate(BlockRecompute(block_logits_fn, block_size), ids, max_new_tokens, block_size,
                                       steps, temperature, meta["mask_token_id"], generator, suppress_ids=padding)
    elif diffusion:
        out = diffusion_generate(logits_fn, ids, max_new_tokens, block_length, steps, temperature,
                                 meta["mask_token_id"], generator, suppress_ids=padding)
    else:
        fn = KVCacheLogits(model, ids.shape[1] + max_new_tokens) if kv_cache else logits_fn
        out = ar_generate(fn, ids, max_new_tokens, temperature, top_k, top_p, generator, eos_token_id=eod,
                          suppress_ids=list(padding) + [meta["mask_token_id"]])
    new = out[0, ids.shape[1]:].tolist()
    text_ids = new[: new.index(eod)] if eod in new else new
    return {"text": tokenizer.detokenize(text_ids), "token_ids": new}


def _check_diffusion_args(max_new_tokens: int, block_length: Optional[int], steps: Optional[int]) -> None:
    """The diffusion sampler's arguments, refused by flag name (the sampler itself, shipped standalone in exports,
    raises plain ValueErrors)."""
    block = max_new_tokens if block_length is None else block_length
    if block <= 0 or max_new_tokens % block:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is not a multiple of --block-length {block}")
    blocks = max_new_tokens // block
    n = max_new_tokens if steps is None else steps
    if n <= 0 or n % blocks:
        raise ConfigError(f"--steps {n} is not a multiple of the number of blocks {blocks} "
                          f"(--max-new-tokens {max_new_tokens} / --block-length {block})")
