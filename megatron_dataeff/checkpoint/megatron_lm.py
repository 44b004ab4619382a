"""Megatron-LM's own checkpoints (`pretrain_gpt.py --ckpt-format torch_dist`): read for `--load`, and written.

A Megatron-LM torch_dist checkpoint is the same megatron-core `dist_checkpointing` directory ours is
(`iter_0000100/` or `release/`, `latest_checkpointed_iteration.txt`), with the model under the same keys
(megatron-core's GPTModel, local or transformer-engine spec: `checkpoint/storage.fit_request`); what
differs is the rest of the common state: Megatron-LM keeps its whole argparse Namespace under `args`, with
`checkpoint_version` 3.0 and `iteration`, where we keep `megatron_dataeff.json`.

* In: `--load MEGATRON_LM_DIR` reads the weights (any objective: that is the AR-to-diffusion adaptation
  and the continued pretraining with token dropout) and starts at iteration 0 with a fresh optimizer, as
  Megatron-LM's `--finetune` does: Megatron-LM's optimizer state is not read.  Its `args` are checked
  against this run's model first, and an architecture this framework does not build (LayerNorm, biases,
  learned positions, MoE, ...) or another shape is refused by Megatron-LM's flag name.
* Out: `write_checkpoint` (tools/export_megatron_lm.py) writes a model-only checkpoint under `release/`
  with the Namespace Megatron-LM's `--load` and `--use-checkpoint-args` read; `no_save_optim` and
  `no_save_rng` in it tell Megatron-LM's `load_checkpoint` to start its optimizer and RNG fresh.
"""

from __future__ import annotations

import argparse
import os
import shutil

from megatron.core import dist_checkpointing

from megatron_dataeff.atomic import publish_directory, write_text_atomic
from megatron_dataeff.checkpoint.format import (LATEST, METADATA, RELEASE, CheckpointError, check_checkpoint_files,
                                                holds_checkpoints, read_common_state)
from megatron_dataeff.checkpoint.storage import load_sharded
from megatron_dataeff.config import weight_shape_fields
from megatron_dataeff.models.family import MEGATRON_LM_ARGS, megatron_lm_problems
from megatron_dataeff.objectives import objective_class

CHECKPOINT_VERSION = 3.0

# The ModelConfig fields the weights' shapes depend on, compared with Megatron-LM's Namespace attributes of the
# same names (our flags are Megatron-LM's), except two read otherwise: the query groups count only under
# --group-query-attention, and the vocabulary padding is compared as the embedding rows it gives.
_SHAPE = tuple(f for f in weight_shape_fields() if f not in ("num_query_groups", "make_vocab_size_divisible_by"))
_TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def megatron_lm_args(ckpt: str) -> tuple[argparse.Namespace, dict]:
    """(Megatron-LM's args, the common state) of a Megatron-LM checkpoint; refused when it has none."""
    common = read_common_state(ckpt)
    args = common.get("args")
    if args is None:
        raise CheckpointError(f"{ckpt}: neither a megatron_dataeff checkpoint (no {METADATA}) nor a Megatron-LM "
                              f"one (no `args` in its common state)")
    if common.get("checkpoint_version", 0) < CHECKPOINT_VERSION:
        raise CheckpointError(f"{ckpt}: Megatron-LM checkpoint_version {common.get('checkpoint_version')}; only "
                              f"{CHECKPOINT_VERSION} (torch_dist, megatron-core GPT) is read")
    return args, common


def _arg(args, *names, default=None):
    for name in names:
        if hasattr(args, name):
            return getattr(args, name)
    return default


def check_megatron_lm_model(ckpt: str, args, model_cfg, vocab_rows: int, tokenizer_type: str) -> None:
    """Refuse, naming Megatron-LM's flags, a checkpoint whose model is not the one this run builds."""
    problems = megatron_lm_problems(args)  # the model family's traits (models/family.py)
    if str(_arg(args, "model_type", default="gpt")).lower().endswith(("bert", "t5", "encoder_and_decoder")):
        problems.append(f"model type {args.model_type}: only GPT (decoder-only) checkpoints are read")
    saved = {field: _arg(args, field) for field in _SHAPE}
    groups = _arg(args, "num_query_groups") if _arg(args, "group_query_attention", default=False) else None
    saved["num_query_groups"] = groups or saved["num_attention_heads"]
    if saved["kv_channels"] is None and saved["hidden_size"] and saved["num_attention_heads"]:
        saved["kv_channels"] = saved["hidden_size"] // saved["num_attention_heads"]
    for field, value in saved.items():
        if value is not None and value != getattr(model_cfg, field):
            problems.append(f"--{field.replace('_', '-')}: checkpoint {value!r}, this run {getattr(model_cfg, field)!r}")
    rows = _arg(args, "padded_vocab_size")
    if rows is not None and rows != vocab_rows:
        tp = _arg(args, "tensor_model_parallel_size", default=1)
        problems.append(f"embedding rows: checkpoint {rows} (Megatron-LM pads the vocabulary to a multiple of "
                        f"--make-vocab-size-divisible-by {_arg(args, 'make_vocab_size_divisible_by')} x TP {tp}), "
                        f"this run {vocab_rows}: set --make-vocab-size-divisible-by so that they agree")
    theirs = _arg(args, "tokenizer_type")
    if theirs is not None and theirs != tokenizer_type:
        problems.append(f"--tokenizer-type: checkpoint {theirs}, this run {tokenizer_type}")
    if problems:
        raise CheckpointError(f"{ckpt} (a Megatron-LM checkpoint) does not fit this model:\n  " + "\n  ".join(problems))


def load_weights(ckpt: str, model, model_cfg, vocab_ids: int, tokenizer_type: str) -> dict:
    """Load a Megatron-LM checkpoint's weights into `model` (this pipeline stage of a model of `model_cfg`
    with `vocab_ids` ids), after checking its args; returns {"megatron_lm_iteration": its iteration}."""
    args, common = megatron_lm_args(ckpt)
    check_megatron_lm_model(ckpt, args, model_cfg, model_cfg.vocab_rows(vocab_ids), tokenizer_type)
    check_checkpoint_files(ckpt, {"written_by": {"megatron_core": "Megatron-LM's"}})
    state = load_sharded({"model": model.sharded_state_dict()}, ckpt, "model")
    model.load_state_dict(state["model"])
    return {"megatron_lm_iteration": common.get("iteration")}


def megatron_lm_namespace(cfg, meta: dict, rows: int) -> argparse.Namespace:
    """The args Megatron-LM's load_checkpoint / --use-checkpoint-args read, for a checkpoint of (cfg, meta)."""
    m = cfg.model
    tok = meta.get("tokenizer", {})
    build = tok.get("build_args") or {}
    ns = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups != m.num_attention_heads, kv_channels=m.kv_channels,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings, rotary_base=m.rotary_base,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        norm_epsilon=m.norm_epsilon, layernorm_epsilon=m.norm_epsilon, qk_layernorm=m.qk_layernorm,
        attention_dropout=m.attention_dropout, hidden_dropout=m.hidden_dropout, init_method_std=m.init_method_std,
        **MEGATRON_LM_ARGS,  # the model family (models/family.py): RMSNorm, SwiGLU, RoPE, no biases, ...
        padded_vocab_size=rows, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        ckpt_format="torch_dist", tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        no_save_optim=True, no_save_rng=True, consumed_train_samples=0, consumed_valid_samples=0,
        skipped_train_samples=0, iteration=0, bf16=cfg.optim.bf16, fp16=False,
        transformer_impl=cfg.compute.transformer_impl,
    )
    ns.update({key: build.get(key, tok.get(key)) for key in _TOKENIZER_ARGS})
    return argparse.Namespace(**ns)


def write_checkpoint(load: str, save: str, load_model, iteration: int | None = None, view: str | None = None) -> str:
    """Write the model of our checkpoint at `load` as a Megatron-LM checkpoint SAVE/release (model only);
    returns its path.  `load_model(load, iteration, view=view)` gives (model, RunConfig, metadata)
    (`inference.loading.load_model_for_inference`).  Only causal models: Megatron-LM's pretrain_gpt.py builds no
    bidirectional model."""
    if holds_checkpoints(save):
        raise CheckpointError(f"--save {save} already holds training checkpoints; choose another directory")
    model, cfg, meta = load_model(load, iteration, view=view)
    if objective_class(cfg.objective).diffusion:
        raise CheckpointError(f"{load} is a masked-diffusion model (bidirectional attention); Megatron-LM's "
                              f"pretrain_gpt.py builds causal models and would read it wrongly"
                              + (": export its --view ar" if meta["config"]["objective"]["name"] == "dual" else ""))
    rows = model.embedding.word_embeddings.weight.shape[0]
    final = os.path.join(save, RELEASE)
    tmp = final + ".tmp"
    os.makedirs(save, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {"model": model.sharded_state_dict(), "args": megatron_lm_namespace(cfg, meta, rows),
             "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "num_floating_point_operations_so_far": 0}
    dist_checkpointing.save(state, tmp)
    publish_directory(tmp, final)
    write_text_atomic(os.path.join(save, LATEST), RELEASE)
    return final
