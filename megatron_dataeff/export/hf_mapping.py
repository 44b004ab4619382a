"""The weight map between our megatron-core GPT and Hugging Face's Llama / Qwen3 layout.

One declarative table (`WEIGHT_MAP`) names every tensor on both sides, with `{i}` for the layer;
two fused megatron tensors need a small helper each:

* `linear_qkv` [(heads + 2 groups) x head_dim, hidden] holds, per query group g, the group's query
  heads, then its key head, then its value head (megatron's interleaved GQA layout);
  HF has separate q_proj / k_proj / v_proj, where query head h uses key/value head
  h // (heads / groups) -- the same grouping, so the split is a reshape.
* `linear_fc1` [2 x ffn, hidden] is [gate; up] (megatron's gated_linear_unit applies the activation
  to the first half); HF has gate_proj and up_proj.

The map covers exactly what our builder makes (RMSNorm, SwiGLU, RoPE, no biases, optional QK
RMSNorm, tied or untied output layer).  Anything else -- a tensor it does not know, a shape that
does not match the config, a megatron or HF option it cannot represent -- raises
`UnsupportedModelError` naming it, rather than writing a model that computes something else.

The vocabulary: the HF `vocab_size` is megatron's padded embedding rows (the tokenizer's ids, the
mask token, then padding to `make_vocab_size_divisible_by`), so logits are comparable one to one;
the padding rows are recorded (`valid_vocab_size` / `suppress_tokens`) and never sampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megatron_dataeff.errors import UserError
from megatron_dataeff.models.family import FAMILY_DEFAULTS, FAMILY_MODEL_ARGS, FAMILY_OPTIONS
from megatron_dataeff.models.shape import ModelShape  # the sizes the map reads (q_rows, kv_rows, ...)

if TYPE_CHECKING:  # for annotations only
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel


class UnsupportedModelError(UserError, ValueError):
    """A checkpoint or HF model the map cannot represent; the message names what."""


# (megatron name, [(HF name, HF shape)], fused kind, present when).  `{i}` is the layer index; a shape is
# a tuple of ModelShape dimensions.  A fused megatron tensor stacks its HF parts along the rows.
V, H, F, D, Q, KV = "vocab_rows", "hidden_size", "ffn_hidden_size", "head_dim", "q_rows", "kv_rows"
WEIGHT_MAP: list[tuple[str, list[tuple[str, tuple[str, ...]]], Optional[str], Optional[str]]] = [
    ("embedding.word_embeddings.weight", [("model.embed_tokens.weight", (V, H))], None, None),
    ("decoder.layers.{i}.input_layernorm.weight", [("model.layers.{i}.input_layernorm.weight", (H,))], None, None),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     [("model.layers.{i}.self_attn.q_proj.weight", (Q, H)), ("model.layers.{i}.self_attn.k_proj.weight", (KV, H)),
      ("model.layers.{i}.self_attn.v_proj.weight", (KV, H))], "qkv", None),
    ("decoder.layers.{i}.self_attention.q_layernorm.weight", [("model.layers.{i}.self_attn.q_norm.weight", (D,))],
     None, "qk_layernorm"),
    ("decoder.layers.{i}.self_attention.k_layernorm.weight", [("model.layers.{i}.self_attn.k_norm.weight", (D,))],
     None, "qk_layernorm"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", [("model.layers.{i}.self_attn.o_proj.weight", (H, Q))],
     None, None),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", [("model.layers.{i}.post_attention_layernorm.weight", (H,))],
     None, None),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     [("model.layers.{i}.mlp.gate_proj.weight", (F, H)), ("model.layers.{i}.mlp.up_proj.weight", (F, H))],
     "gate_up", None),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", [("model.layers.{i}.mlp.down_proj.weight", (H, F))], None, None),
    ("decoder.final_layernorm.weight", [("model.norm.weight", (H,))], None, None),
    ("output_layer.weight", [("lm_head.weight", (V, H))], None, "untied"),
]

# transformer-engine's spec fuses the pre-attention / pre-MLP norms into the next linear layer.
_MEGATRON_ALIASES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------
# Fused tensors


def split_qkv(w: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron linear_qkv [(heads + 2 groups) x head_dim, hidden] -> (q, k, v) HF projections."""
    per = heads // groups
    w = w.reshape(groups, (per + 2) * head_dim, -1)
    q = w[:, : per * head_dim].reshape(heads * head_dim, -1)
    k = w[:, per * head_dim: (per + 1) * head_dim].reshape(groups * head_dim, -1)
    v = w[:, (per + 1) * head_dim:].reshape(groups * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of `split_qkv`."""
    per = heads // groups
    hidden = q.shape[-1]
    parts = (q.reshape(groups, per * head_dim, hidden), k.reshape(groups, head_dim, hidden),
             v.reshape(groups, head_dim, hidden))
    return torch.cat(parts, dim=1).reshape((heads + 2 * groups) * head_dim, hidden).contiguous()


def split_gate_up(w: torch.Tensor):
    """megatron linear_fc1 [2 x ffn, hidden] = [gate; up] -> (gate, up)."""
    gate, up = w.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor):
    """Inverse of `split_gate_up`."""
    return torch.cat([gate, up], dim=0).contiguous()


# ----------------------------------------------------------------------------------------------
# The table, expanded


def _expanded(shape: ModelShape):
    """(megatron name, [(HF name, HF shape)], fused kind) of every tensor a model of this shape has."""
    for mname, hf, kind, when in WEIGHT_MAP:
        if when == "qk_layernorm" and not shape.qk_layernorm:
            continue
        if when == "untied" and shape.tied:
            continue
        layers = range(shape.num_layers) if "{i}" in mname else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            yield fmt(mname), [(fmt(h), tuple(getattr(shape, d) for d in dims)) for h, dims in hf], kind


def _entries(shape: ModelShape):
    """(megatron name, [HF names], fused kind) of every tensor a model of this shape has."""
    for mname, hf, kind in _expanded(shape):
        yield mname, [h for h, _ in hf], kind


def _expected_hf_shapes(shape: ModelShape) -> dict[str, tuple]:
    """{HF name: shape} of every HF tensor of a model of this shape."""
    return {h: dims for _, hf, _ in _expanded(shape) for h, dims in hf}


def _expected_megatron_shape(hf_shapes: list[tuple]) -> tuple:
    """A fused tensor stacks its HF parts along the output (row) dimension."""
    if len(hf_shapes) == 1:
        return hf_shapes[0]
    return (sum(s[0] for s in hf_shapes), hf_shapes[0][1])


def _check_names(found: set, expected: set, side: str) -> None:
    unknown, missing = sorted(found - expected), sorted(expected - found)
    problems = []
    if unknown:
        problems.append(f"tensors the {side} map does not know (an option it cannot represent): "
                        f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    if missing:
        problems.append(f"tensors missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise UnsupportedModelError("; ".join(problems))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise UnsupportedModelError(f"{name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected)}")


def _normalise_megatron(state_dict: dict) -> dict:
    out = {}
    for name, value in state_dict.items():
        if name.endswith("_extra_state"):  # fp8 / TE bookkeeping, no weights
            continue
        for te_name, local_name in _MEGATRON_ALIASES.items():
            if name.endswith(te_name):
                name = name[: -len(te_name)] + local_name
        out[name] = value
    return out


def megatron_to_hf(state_dict: dict, shape: ModelShape) -> dict[str, torch.Tensor]:
    """A TP=1 megatron state dict -> HF (Llama / Qwen3 names) tensors."""
    sd = _normalise_megatron(state_dict)
    if shape.tied and "output_layer.weight" in sd:  # a last pipeline stage's copy of the embedding
        sd.pop("output_layer.weight")
    entries = list(_entries(shape))
    _check_names(set(sd), {m for m, _, _ in entries}, "megatron")
    out = {}
    for group in megatron_groups(shape):
        out.update(megatron_group_to_hf({m: sd[m] for m in group}, shape))
    return out


def megatron_groups(shape: ModelShape) -> list[list[str]]:
    """The megatron tensor names of a model in export order, one group per step: the embedding, each
    layer's tensors, then the final norm and output layer (what a streaming export holds at once)."""
    groups: dict = {}
    for mname, _, _ in _entries(shape):
        layer = mname.split(".")[2] if mname.startswith("decoder.layers.") else ("end" if "final" in mname or
                                                                                   "output" in mname else "start")
        groups.setdefault(layer, []).append(mname)
    return list(groups.values())


def megatron_group_to_hf(tensors: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Megatron tensors {name: tensor} (some of a model's, TP=1, local names) -> their HF tensors."""
    hf_shapes = _expected_hf_shapes(shape)
    entries = {m: (hnames, kind) for m, hnames, kind in _entries(shape)}
    out = {}
    for mname, t in tensors.items():
        if mname not in entries:
            raise UnsupportedModelError(f"a tensor the megatron map does not know: {mname}")
        hnames, kind = entries[mname]
        _check_shape(mname, t, _expected_megatron_shape([hf_shapes[h] for h in hnames]))
        if kind == "qkv":
            parts = split_qkv(t, shape.num_attention_heads, shape.num_query_groups, shape.head_dim)
        elif kind == "gate_up":
            parts = split_gate_up(t)
        else:
            parts = (t,)
        for hname, part in zip(hnames, parts):
            out[hname] = part.detach()
    return out


def megatron_checkpoint_key(name: str) -> tuple[str, int | None]:
    """(dist_checkpointing key, layer index or None) of a megatron module-state-dict name: a layer's tensors
    are stacked along a leading layer axis under one key, and the norms stored under transformer-engine's
    names (megatron-core's local spec maps them so: one checkpoint for both specs)."""
    parts = name.split(".")
    if not (name.startswith("decoder.layers.") and parts[2].isdigit()):
        return name, None
    rest = "." + ".".join(parts[3:])
    for te_name, local_name in _MEGATRON_ALIASES.items():
        if rest == local_name:
            rest = te_name
    return "decoder.layers" + rest, int(parts[2])


def check_hf_names(names: set, get, shape: ModelShape) -> None:
    """Refuse HF tensors (their `names`; `get(name)` reads one) that are not exactly those of a model of
    `shape`; a tied model's lm_head, when present, must equal its embedding."""
    names = {n for n in names if not n.endswith(_HF_IGNORED_SUFFIXES)}
    if shape.tied and "lm_head.weight" in names:
        names.discard("lm_head.weight")
        if not torch.equal(get("lm_head.weight"), get("model.embed_tokens.weight")):
            raise UnsupportedModelError("tie_word_embeddings is true but lm_head.weight differs from "
                                        "model.embed_tokens.weight")
    _check_names(names, set(_expected_hf_shapes(shape)), "HF")


def megatron_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """{megatron name: shape} of every tensor of a model of `shape` (TP=1)."""
    hf_shapes = _expected_hf_shapes(shape)
    return {m: _expected_megatron_shape([hf_shapes[h] for h in hnames]) for m, hnames, _ in _entries(shape)}


def hf_tensor_for(mname: str, get, shape: ModelShape) -> torch.Tensor:
    """The megatron tensor `mname` from its HF parts, read by `get(name)` (one tensor's parts in memory)."""
    entry = next(((hnames, kind) for m, hnames, kind in _entries(shape) if m == mname), None)
    if entry is None:
        raise UnsupportedModelError(f"a tensor the megatron map does not know: {mname}")
    hnames, kind = entry
    hf_shapes = _expected_hf_shapes(shape)
    parts = [get(h) for h in hnames]
    for h, part in zip(hnames, parts):
        _check_shape(h, part, hf_shapes[h])
    if kind == "qkv":
        return merge_qkv(*parts, shape.num_attention_heads, shape.num_query_groups, shape.head_dim)
    if kind == "gate_up":
        return merge_gate_up(*parts)
    return parts[0]


# ----------------------------------------------------------------------------------------------
# Options the map represents


# TransformerConfig fields and the only value the map represents: the model family's (models/family.py), as
# are the GPTModel arguments checked below.
REQUIRED_MEGATRON_OPTIONS = {**FAMILY_OPTIONS, **FAMILY_DEFAULTS}


def check_megatron_model(model: GPTModel, rotary_base: float) -> None:
    """Raise UnsupportedModelError, naming the options, if a GPTModel computes something the map
    (and Llama / Qwen3) cannot represent."""
    def shown(value):
        return getattr(value, "__name__", None) or repr(value)  # activation functions by name

    config = model.config
    problems = []
    for name, want in REQUIRED_MEGATRON_OPTIONS.items():
        if hasattr(config, name) and getattr(config, name) != want:
            problems.append(f"{name}={shown(getattr(config, name))} (supported: {shown(want)})")
    for name, want in FAMILY_MODEL_ARGS.items():  # GPTModel keeps its arguments as attributes
        if getattr(model, name, want) != want:
            problems.append(f"{name}={getattr(model, name)!r} (supported: {want!r})")
    rope: RotaryEmbedding | None = getattr(model, "rotary_pos_emb", None)
    if rope is not None:
        hd = config.kv_channels
        want = 1.0 / (rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        have = rope.inv_freq.detach().float().cpu()
        if have.shape != want.shape or not torch.allclose(have, want, rtol=1e-6, atol=0):
            problems.append("rotary embedding frequencies differ from plain RoPE with rotary_base="
                            f"{rotary_base} (rotary_percent < 1 or RoPE scaling)")
        if getattr(rope, "seq_len_interpolation_factor", None):
            problems.append(f"seq_len_interpolation_factor={rope.seq_len_interpolation_factor}")
    if problems:
        raise UnsupportedModelError("the checkpoint's model uses options the HF map cannot represent: "
                                    + "; ".join(problems))


def read_hf_config(cfg: dict) -> dict:
    """The model fields of an HF config (llama, qwen3 or our dataeff_mdm; the full `to_dict()` of the
    config class, so that defaults are filled in), checked.

    Returns dict(model_type, shape fields, rope_theta, rms_norm_eps, max_position_embeddings, tied).
    Works with config.json written by transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
    (`rope_parameters`).
    """
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "qwen3", "dataeff_mdm"):
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported (llama, qwen3, dataeff_mdm)")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (supported: 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            problems.append(f"{flag}=true")
    if cfg.get("pretraining_tp") not in (None, 1):
        problems.append(f"pretraining_tp={cfg['pretraining_tp']}")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types other than full_attention: {sorted(set(layer_types))}")
    rope_params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for source in (rope_params, scaling):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            problems.append(f"rope_type={rope_type!r} (supported: plain RoPE)")
    if problems:
        raise UnsupportedModelError(f"HF {model_type} config options the map cannot represent: "
                                    + "; ".join(problems))
    heads = cfg["num_attention_heads"]
    rope_theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return dict(
        model_type=model_type,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        qk_layernorm=model_type == "qwen3" or bool(cfg.get("qk_layernorm", False)),
        tied=bool(cfg.get("tie_word_embeddings", model_type == "dataeff_mdm")),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
    )
