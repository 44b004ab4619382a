"""Incremental AR decoding of a megatron-core GPTModel with a static KV cache.

megatron-core does the work: given `inference_context` (a `StaticInferenceContext`), each attention
layer writes the keys / values of the positions it is fed into the context's buffers at
`sequence_len_offset` and attends over everything cached so far (causal mask for the prompt, no
mask for the later one-token steps), RoPE is taken at the cached positions, and only the last
position's logits are computed.  Two things are ours:

* the buffers are allocated here, on the model's device and in its dtype: megatron's
  `Attention._allocate_memory` puts them on `torch.cuda.current_device()`, which fails on CPU;
  a layer whose buffers are already in the context uses them as they are;
* `sequence_len_offset` is advanced after each call (megatron's generation controller does this
  in its own loop, which we do not use);
* from megatron-core 0.18 the model takes its inference paths (last-token logits, decode-only
  attention) only while `InferenceMode` is active, which megatron's engines set; we set it around
  our call, and keep only the last position's logits on every release.

Greedy tokens equal those of the full-recompute path (tests/test_generate.py); the logits agree to
floating-point reduction order (~1e-5 in fp32), not bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for annotations only: megatron is imported where it is used
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.attention import SelfAttention


def _inference_mode():
    """megatron-core's process-wide inference flag (0.18 and later), held for the `with` block."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:  # megatron-core <= 0.17 decides by inference_context alone
        return contextlib.nullcontext()
    return InferenceMode.active()


class KVCacheLogits:
    """A `logits_fn` for `sampling.ar_generate` over a causal GPTModel (one pipeline stage, eval mode)
    that keeps a KV cache of up to `max_length` positions.

    A call with ids [batch, seq] that extend the previous call's ids runs only the new positions;
    any other ids (a new prompt, another batch size) start a new cache.  Returns [batch, 1, vocab]:
    the logits of the last position.
    """

    def __init__(self, model: GPTModel, max_length: int):
        from megatron.core.transformer.enums import AttnMaskType

        if not (model.pre_process and model.post_process):
            raise ValueError("a KV cache needs the whole model (one pipeline stage)")
        if any(layer.self_attention.attn_mask_type != AttnMaskType.causal for layer in model.decoder.layers):
            raise ValueError("a KV cache needs a causal model; this one attends both ways (masked diffusion)")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model
        self.max_length = int(max_length)
        self._context = None
        self._ids = None  # [batch, cached] the ids whose keys and values are cached

    def reset(self) -> None:
        """Drop the cache (the next call starts from its first position)."""
        self._context, self._ids = None, None

    def _extends_cache(self, ids: torch.Tensor) -> bool:
        cached = self._ids
        return (cached is not None and ids.shape[0] == cached.shape[0] and ids.shape[1] > cached.shape[1]
                and torch.equal(ids[:, : cached.shape[1]], cached))

    def _new_context(self, batch: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(batch, self.max_length)
        param = next(self.model.parameters())
        for layer in self.model.decoder.layers:
            attn: SelfAttention = layer.self_attention
            shape = (self.max_length, batch, attn.num_query_groups_per_partition)
            context.key_value_memory_dict[attn.layer_number] = (
                torch.empty(*shape, attn.key_hidden_size, dtype=param.dtype, device=param.device),
                torch.empty(*shape, attn.val_hidden_size, dtype=param.dtype, device=param.device))
        return context

    @torch.no_grad()
    def __call__(self, ids) -> torch.Tensor:
        if self.model.training:
            raise ValueError("a KV cache is for inference: call model.eval() first")
        ids = torch.as_tensor(ids, dtype=torch.long)
        batch, seq = ids.shape
        if seq > self.max_length:
            raise ValueError(f"sequence of {seq} tokens exceeds the KV cache's max_length {self.max_length}")
        if not self._extends_cache(ids):
            self._context, self._ids = self._new_context(batch), None
        start = self._context.sequence_len_offset
        device = next(self.model.parameters()).device
        new = ids[:, start:].to(device)
        pos = torch.arange(start, seq, device=device)[None, :].expand(batch, -1)
        with _inference_mode():
            logits = self.model(new, pos, None, inference_context=self._context, runtime_gather_output=True)
        self._context.sequence_len_offset = seq
        self._ids = ids.clone()
        return logits[:, -1:]
