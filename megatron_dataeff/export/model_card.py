"""The model card (README.md) of an HF export: what was trained, on how much data, how, and how well.

Everything comes from the checkpoint's metadata (`Trainer.run_facts` plus the position in the run and its
validation record), so the card describes the checkpoint that was exported, not the command that is running.
"""

from __future__ import annotations

import math

from megatron_dataeff.arguments import command_line
from megatron_dataeff.config import RunConfig
from megatron_dataeff.objectives import TokenDropoutObjective, build_objective, objective_class
from megatron_dataeff.objectives.documents import flags_on


def _tokens(n) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit} ({int(n):,})"
    return f"{int(n):,}"


def _objective_line(cfg, meta: dict) -> str:
    train_iters = (meta.get("schedule") or {}).get("train_iters")
    try:
        return build_objective(cfg, meta["mask_token_id"], vocab_ids=meta["vocab_ids"],
                               train_iters=train_iters).describe()
    except Exception:  # an objective that needs what this checkpoint does not record: its name
        return cfg.objective.name


def _documents_line(dcfg) -> str:
    """How the documents packed into a training window were treated (Megatron-LM's three flags)."""
    on = flags_on(dcfg)
    if not on:
        return ("one stream: attention and positions ran across document boundaries and the EOD token was a "
                "target like any other (Megatron-LM's default)")
    parts = []
    if dcfg.reset_attention_mask:
        parts.append("each token attended only to its own document")
    if dcfg.reset_position_ids:
        parts.append("positions restarted after each EOD")
    if dcfg.eod_mask_loss:
        parts.append("EOD positions carried no loss")
    return f"{'; '.join(parts)} ({', '.join(f'`{f}`' for f in on)})"


def _validation_rows(meta: dict) -> list[str]:
    record = meta.get("validation") or {}
    rows = []
    for which in ("last", "best"):
        rec = record.get(which)
        if not rec:
            continue
        losses = ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("loss") and v is not None)
        ppl = math.exp(min(rec["loss"], 50))
        rows.append(f"| {which} | {rec['iteration']} | {rec.get('epoch', float('nan')):.2f} | {losses} | {ppl:.2f} |")
    return rows


def model_card(cfg, meta: dict, *, architecture: str, trained_objective: str, num_parameters: int,
               has_tokenizer: bool) -> str:
    """README.md text of an export of the checkpoint described by (cfg, meta) as `architecture`."""
    trained = RunConfig.from_dict(meta["config"]) if meta.get("config") else cfg  # as trained: its layout too
    m = cfg.model
    objective = objective_class(cfg.objective)
    diffusion = objective.diffusion
    seq, gbs = m.seq_length, cfg.optim.global_batch_size
    iteration = meta.get("iteration") or 0
    seen = iteration * gbs * seq if gbs else None
    unique = meta.get("unique_tokens")
    epochs = meta.get("epoch")
    tags = ["megatron-core", "megatron_dataeff", "masked-diffusion" if diffusion else "causal-lm",
            f"objective-{trained_objective}"]
    if issubclass(objective, TokenDropoutObjective):
        tags.append("token-dropout")
    front = ["---", "library_name: transformers", f"pipeline_tag: {'fill-mask' if diffusion else 'text-generation'}",
             "tags:", *[f"- {t}" for t in tags], "---", ""]
    if diffusion:
        usage = ["```python", "import torch", "from transformers import AutoModel, AutoTokenizer",
                 "model = AutoModel.from_pretrained(PATH, trust_remote_code=True, dtype=torch.float32)",
                 "tok = AutoTokenizer.from_pretrained(PATH)" if has_tokenizer else "# ids: see the tokenizer note",
                 "out = model.generate(torch.tensor([prompt_ids]), gen_length=64, block_length=32, steps=64)",
                 "```"]
    else:
        usage = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 "model = AutoModelForCausalLM.from_pretrained(PATH)",
                 "tok = AutoTokenizer.from_pretrained(PATH)" if has_tokenizer else "# ids: see the tokenizer note",
                 "```"]
    tok = meta.get("tokenizer", {})
    tok_line = (f"`{tok.get('tokenizer_type')}`, exported in Hugging Face form (encodes as training did)"
                if has_tokenizer else f"`{tok.get('tokenizer_type')}`: no Hugging Face form; token ids are those of "
                                      "megatron_dataeff's tokenizer of this type")
    view = ""
    if trained_objective != cfg.objective.name:
        view = (f" This export is its `{cfg.objective.name}` view (`--view {cfg.objective.name}`): the same weights "
                f"used as {'a masked-diffusion model' if diffusion else 'a causal LM'}.")
    lines = front + [
        f"# {architecture} trained with megatron_dataeff",
        "",
        f"Trained with `--objective {trained_objective}` ({_objective_line(cfg, meta)}).{view}",
        "",
        "## Model",
        "",
        f"- {architecture}: {num_parameters / 1e6:.1f}M parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"FFN {m.ffn_hidden_size}, {m.num_attention_heads} heads ({m.num_query_groups} key/value groups, head "
        f"dimension {m.kv_channels}), {'QK-norm, ' if m.qk_layernorm else ''}RoPE base {m.rotary_base:g}, "
        f"{'untied' if m.untie_embeddings_and_output_weights else 'tied'} embeddings",
        f"- {'bidirectional attention, masked-diffusion generate()' if diffusion else 'causal attention'}",
        f"- vocabulary: {meta.get('vocab_ids')} ids in use (mask token {meta.get('mask_token_id')}); tokenizer "
        f"{tok_line}",
        "",
        "## Data and training",
        "",
        f"- unique training tokens: {_tokens(unique)}",
        f"- tokens seen: {_tokens(seen)} in {iteration:,} iterations of {gbs} x {seq}"
        + (f", {epochs:.2f} epochs" if epochs is not None else ""),
        f"- data: `{' '.join(map(str, cfg.data.data_path or [])) or 'the embedded default corpus'}`",
        f"- regularisation: token dropout {cfg.objective.token_dropout_rate:g}, hidden dropout "
        f"{m.hidden_dropout:g}, attention dropout {m.attention_dropout:g}, MLP dropout {m.mlp_dropout:g}, weight "
        f"decay {cfg.optim.weight_decay:g}",
        f"- packed documents: {_documents_line(trained.data)}",
        f"- written by {', '.join(f'{k} {v}' for k, v in (meta.get('written_by') or {}).items()) or 'unknown'}",
        "",
        "Command line (the flags that differ from the defaults):",
        "",
        "```",
        "pretrain_diffusion.py " + " ".join(_quoted(command_line(trained))),
        "```",
        "",
        "## Validation",
        "",
    ]
    rows = _validation_rows(meta)
    if rows:
        views = objective_class(trained.objective).evaluation_views
        kind = (f"the {views[0]} view's loss, with " + "/".join(f"`loss_{v}`" for v in views) + " each view's"
                if len(views) > 1 else
                "the diffusion ELBO, a bound on the NLL" if diffusion else "the AR NLL")
        lines += [f"Held-out loss in nats per token ({kind}):", "",
                  "| | iteration | epoch | loss | perplexity |", "|---|---|---|---|---|", *rows]
    else:
        lines.append("No validation was recorded in this checkpoint.")
    lines += ["", "## Use", "", *[line.replace("PATH", '"path/to/this/export"') for line in usage], ""]
    return "\n".join(lines)


def _quoted(argv: list[str]) -> list[str]:
    import shlex

    return [shlex.quote(a) for a in argv]
