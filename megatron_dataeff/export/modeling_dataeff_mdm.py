"""A masked-diffusion GPT exported by megatron_dataeff (or a block-diffusion one), and its samplers.

Standalone: imports only torch and transformers, so it is copied into an export directory and loaded
with `AutoModel.from_pretrained(path, trust_remote_code=True)`.  Weight names are Llama's
(`model.layers.N.self_attn.q_proj.weight`, ...; Qwen3's `q_norm`/`k_norm` when `qk_layernorm`).
Attention is bidirectional; the model fills in `config.mask_token_id`.

`diffusion_generate` (masked diffusion) and `block_diffusion_generate` (block diffusion, BD3-LM: `config.block_size`)
are the sampling algorithms as pure functions of a logits callable, so that megatron_dataeff's `tools/generate.py`
runs exactly this code on a megatron model.
"""

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_dataeff_mdm import DataEffMDMConfig

# ----------------------------------------------------------------------------------------------
# Sampling: low-confidence remasking over semi-autoregressive blocks (LLaDA's algorithm)


def _transfer_schedule(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[batch] masked counts -> [batch, steps] tokens to commit per step (as even as possible)."""
    base = num_masked // steps
    rem = num_masked % steps
    extra = torch.arange(steps, device=num_masked.device)[None, :] < rem[:, None]
    return base[:, None] + extra.long()


def _masked_sequence(prompt_ids, gen_length: int, mask_token_id: int, suppress_ids: Iterable[int]):
    """(x [batch, prompt + gen_length] with the generated part masked, prompt length, ids never predicted)."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None, :]
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_token_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    banned = torch.tensor(sorted(set(int(i) for i in suppress_ids) | {int(mask_token_id)}), dtype=torch.long)
    return x, plen, banned


def _commit_step(x: torch.Tensor, logits: torch.Tensor, start: int, end: int, counts: torch.Tensor,
                 temperature: float, generator: Optional[torch.Generator], banned: torch.Tensor,
                 mask_token_id: int) -> None:
    """One denoising step of positions start..end-1 of x (in place): predict every masked token from `logits`
    [batch, end - start, vocab] (argmax, or Gumbel-max at `temperature`), never a `banned` id, and commit the
    `counts[row]` most confident predictions of each row ("low-confidence remasking")."""
    logits = logits.float()
    logits[..., banned.to(logits.device)] = float("-inf")
    if temperature > 0:
        # Gumbel-max: argmax(logits / T + g) samples softmax(logits / T).
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0)))
        x0 = (logits.double() / temperature + gumbel.to(logits.device)).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    confidence = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
    masked = x[:, start:end] == mask_token_id
    confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
    for row in range(x.shape[0]):
        k = int(counts[row])
        if k:
            idx = confidence[row].topk(k).indices
            x[row, start + idx] = x0[row, idx]


@torch.no_grad()
def diffusion_generate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids,
    gen_length: int,
    block_length: Optional[int] = None,
    steps: Optional[int] = None,
    temperature: float = 0.0,
    mask_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    suppress_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Masked-diffusion sampling; returns [batch, prompt + gen_length] ids (prompt included).

    The prompt ([batch, prompt] or [prompt]) is followed by gen_length mask tokens, filled block by
    block (block_length tokens, left to right).  Each block gets steps / num_blocks steps; each step
    runs `logits_fn(ids) -> [batch, seq, vocab]`, predicts every masked token of the block (argmax,
    or Gumbel-max sampling at `temperature` > 0 with noise drawn from `generator`), and commits the
    predictions with the highest probability ("low-confidence remasking"): the block's masked
    tokens are spread as evenly as possible over its steps.  The mask token and `suppress_ids`
    (padding rows of the vocabulary) are never predicted.
    """
    if mask_token_id is None:
        raise ValueError("diffusion_generate needs mask_token_id")
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    block_length = gen_length if block_length is None else int(block_length)
    steps = gen_length if steps is None else int(steps)
    if block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps <= 0 or steps % num_blocks:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks} "
                         f"(gen_length {gen_length} / block_length {block_length})")
    steps_per_block = steps // num_blocks
    x, plen, banned = _masked_sequence(prompt_ids, gen_length, mask_token_id, suppress_ids)

    for b in range(num_blocks):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        counts = _transfer_schedule((x[:, start:end] == mask_token_id).sum(1), steps_per_block).cpu()
        for i in range(steps_per_block):
            if not bool((counts[:, i] > 0).any()):
                continue
            _commit_step(x, logits_fn(x)[:, start:end], start, end, counts[:, i], temperature, generator, banned,
                         mask_token_id)
    return x


def block_diffusion_keep(length: int, block_size: int, device=None) -> torch.Tensor:
    """[2 * length, 2 * length] bool, True = attends: block diffusion's mask over a [x_t | x_0] row of two halves of
    `length` tokens (BD3-LM): a noisy block sees itself both ways and the clean blocks before it; a clean block the
    clean blocks up to itself.  (megatron_dataeff trains with the same mask: objectives/row_masks.py.)"""
    i = torch.arange(2 * length, device=device)
    clean = i >= length
    block = torch.where(clean, i - length, i) // block_size
    q_clean, kv_clean = clean[:, None], clean[None, :]
    q_block, kv_block = block[:, None], block[None, :]
    return (((q_block == kv_block) & (q_clean == kv_clean))
            | ((q_block > kv_block) & kv_clean & ~q_clean)
            | ((q_block >= kv_block) & kv_clean & q_clean))


class BlockRecompute:
    """Block logits by recomputing the sequence so far in the training form: ids [batch, 2e] = [noisy | clean],
    positions 0..e-1 twice, the [2e, 2e] mask of `block_diffusion_keep` (e: the end of the current block);
    `logits_fn(ids, position_ids, keep) -> [batch, 2e, vocab]`."""

    def __init__(self, logits_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 block_size: int):
        self.logits_fn, self.block_size = logits_fn, int(block_size)

    def logits(self, x: torch.Tensor, block_start: int, start: int, end: int) -> torch.Tensor:
        """[batch, end - start, vocab] of positions start..end-1 of the block beginning at block_start."""
        keep = block_diffusion_keep(end, self.block_size, x.device)
        positions = torch.arange(end, device=x.device).repeat(2)[None, :].expand(x.shape[0], -1)
        row = torch.cat([x[:, :end], x[:, :end]], 1)  # the clean half from block_start on is never seen
        return self.logits_fn(row, positions, keep)[:, start:end]

    def block_done(self, x: torch.Tensor, block_start: int, end: int) -> None:
        """A block is finished (nothing to keep here)."""


@torch.no_grad()
def block_diffusion_generate(
    blocks,
    prompt_ids,
    gen_length: int,
    block_size: int,
    steps: Optional[int] = None,
    temperature: float = 0.0,
    mask_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    suppress_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Block-diffusion sampling (BD3-LM); returns [batch, prompt + gen_length] ids (prompt included).

    The sequence is cut into blocks of `block_size` tokens from position 0, as in training; the blocks after the
    prompt are generated left to right.  Each block starts with its unknown tokens masked and is unmasked over
    `steps` steps (default: one token per step; the prompt's tail counts as known), committing the most
    confident predictions (argmax, or Gumbel-max at `temperature`), as `diffusion_generate` does in a block; a
    finished block is clean context for the next.  `blocks` gives the logits of a block given the clean blocks
    before it: `BlockRecompute` (any logits callable: the sequence so far in the training form each step) or
    `BlockKVCache` (the exported model: clean blocks kept as keys and values).
    """
    if mask_token_id is None:
        raise ValueError("block_diffusion_generate needs mask_token_id")
    if gen_length <= 0 or block_size <= 0:
        raise ValueError(f"gen_length and block_size must be positive, got {gen_length} and {block_size}")
    x, plen, banned = _masked_sequence(prompt_ids, gen_length, mask_token_id, suppress_ids)
    total = plen + gen_length
    first, last = plen // block_size, (total - 1) // block_size
    for b in range(first, last + 1):
        block_start = b * block_size
        start, end = max(plen, block_start), min(total, (b + 1) * block_size)
        n_steps = (end - start) if steps is None else int(steps)
        if n_steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        counts = _transfer_schedule((x[:, start:end] == mask_token_id).sum(1), n_steps).cpu()
        for i in range(n_steps):
            if not bool((counts[:, i] > 0).any()):
                continue
            _commit_step(x, blocks.logits(x, block_start, start, end), start, end, counts[:, i], temperature,
                         generator, banned, mask_token_id)
        blocks.block_done(x, block_start, end)
    return x


# ----------------------------------------------------------------------------------------------
# Model


class DataEffRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama's and megatron's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin: [batch, 1, seq, head_dim] (non-interleaved halves, as Llama and megatron)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DataEffAttention(nn.Module):
    """Grouped-query attention with RoPE, both directions unless `config.bidirectional` is false."""

    def __init__(self, config: DataEffMDMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.causal = not config.bidirectional
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        if config.qk_layernorm:
            self.q_norm = DataEffRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = DataEffRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, attn_mask, past=None, keep=None):
        """`past`: (k, v) [batch, kv heads, cached, head_dim] of earlier positions, attended to with the segment
        (block diffusion's clean blocks); `keep`: a list that receives this segment's rotated (k, v)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if keep is not None:
            keep.append((k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        if self.num_kv != self.num_heads:
            rep = self.num_heads // self.num_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             is_causal=self.causal and attn_mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class DataEffMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DataEffMDMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DataEffDecoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, config: DataEffMDMConfig):
        super().__init__()
        self.input_layernorm = DataEffRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DataEffAttention(config)
        self.post_attention_layernorm = DataEffRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DataEffMLP(config)

    def forward(self, x, cos, sin, attn_mask, past=None, keep=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class DataEffMDMPreTrainedModel(PreTrainedModel):
    config_class = DataEffMDMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DataEffDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DataEffRMSNorm):
            nn.init.ones_(module.weight)


class DataEffMDMModel(DataEffMDMPreTrainedModel):
    """Embedding + layers + final norm: [batch, seq] ids -> [batch, seq, hidden]."""

    def __init__(self, config: DataEffMDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DataEffDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = DataEffRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, keep=None):
        """[batch, seq] ids -> [batch, seq, hidden].  `past_key_values`: per layer (k, v) of earlier positions that
        every position of `input_ids` attends to as well (block diffusion's clean blocks); `keep`: a list that
        receives each layer's (k, v) of this input."""
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None, :].expand(b, s)
        cos, sin = _rope(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:  # [batch or 1, 1, seq, seq], True = attends
            attn_mask = attention_mask.bool()
        elif attention_mask is not None:  # [batch, seq] 1 = attend, 0 = padding
            attn_mask = attention_mask.bool()[:, None, None, :]
            if not self.config.bidirectional:
                causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
                attn_mask = attn_mask & causal
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, None if past_key_values is None else past_key_values[i], keep)
        return self.norm(x)


class DataEffMDMForMaskedLM(DataEffMDMPreTrainedModel):
    """The masked-diffusion LM: logits for every position, and `generate` (diffusion sampling)."""

    def __init__(self, config: DataEffMDMConfig):
        super().__init__(config)
        self.model = DataEffMDMModel(config)
        # Tied embeddings are used directly (no lm_head parameter), so no tying machinery is needed.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        """logits [batch, seq, vocab]; with labels (-100 = ignore), the mean cross-entropy as loss."""
        h = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids, gen_length=None, max_new_tokens=None, block_length=None, steps=None,
                 temperature=0.0, seed=None, generator=None, attention_mask=None, **kwargs):
        """[batch, prompt + gen_length] ids: masked-diffusion sampling (see `diffusion_generate`).

        gen_length (or max_new_tokens) tokens after the prompt; block_length defaults to gen_length,
        steps to gen_length (one token per step); `seed` or `generator` (a CPU generator) makes
        sampling reproducible.  Prompts of a batch must have the same length (no padding).
        """
        if kwargs:
            raise TypeError(f"generate() got unsupported arguments {sorted(kwargs)}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("generate() does not support padded prompts; pass prompts of equal length")
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        gen_length = gen_length if gen_length is not None else max_new_tokens
        if gen_length is None:
            raise ValueError("generate needs gen_length (or max_new_tokens)")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        padding = range(self.config.valid_vocab_size, self.config.vocab_size)
        block_size = getattr(self.config, "block_size", None)
        if block_size:  # block diffusion: `steps` per block; block_length is the model's own
            if block_length is not None and int(block_length) != block_size:
                raise ValueError(f"this block-diffusion model was trained with blocks of {block_size} tokens")

            return block_diffusion_generate(BlockKVCache(self), input_ids, gen_length, block_size, steps,
                                            temperature, self.config.mask_token_id, generator, suppress_ids=padding)
        return diffusion_generate(lambda ids: self(ids).logits, input_ids, gen_length, block_length, steps,
                                  temperature, self.config.mask_token_id, generator, suppress_ids=padding)


class BlockKVCache:
    """Block logits of an exported block-diffusion model with its clean blocks kept as keys and values: the clean
    context is computed once (block-causally, as the clean half of training), a block being denoised attends to the
    cache and to itself (both ways), and a finished block joins the cache as clean context."""

    def __init__(self, model: DataEffMDMForMaskedLM):
        self.model = model
        self.block_size = int(model.config.block_size)
        self.cache = None  # per layer (k, v) of the clean positions 0..cached-1
        self.cached = 0

    def _run(self, ids, first: int, attention_mask=None, keep=None):
        b, s = ids.shape
        positions = torch.arange(first, first + s, device=ids.device)[None, :].expand(b, -1)
        h = self.model.model(ids, attention_mask=attention_mask, position_ids=positions, past_key_values=self.cache,
                             keep=keep)
        weight = self.model.model.embed_tokens.weight if self.model.lm_head is None else self.model.lm_head.weight
        return F.linear(h, weight)

    def _extend(self, x: torch.Tensor, upto: int) -> None:
        """Clean positions cached..upto-1 join the cache (block-causal among themselves, all of the cache)."""
        if upto <= self.cached:
            return
        s, B = upto - self.cached, self.block_size
        block = (torch.arange(self.cached, upto, device=x.device)) // B
        keep_mask = (block[None, :] <= block[:, None])
        if self.cache is not None:
            keep_mask = torch.cat([torch.ones(s, self.cached, dtype=torch.bool, device=x.device), keep_mask], 1)
        kept = []
        self._run(x[:, self.cached:upto], self.cached, attention_mask=keep_mask[None, None], keep=kept)
        if self.cache is None:
            self.cache = kept
        else:
            self.cache = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(self.cache, kept)]
        self.cached = upto

    def logits(self, x: torch.Tensor, block_start: int, start: int, end: int) -> torch.Tensor:
        self._extend(x, block_start)  # the clean blocks before this one
        return self._run(x[:, block_start:end], block_start)[:, start - block_start:]

    def block_done(self, x: torch.Tensor, block_start: int, end: int) -> None:
        self._extend(x, end)
