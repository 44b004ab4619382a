"""Import a Hugging Face Llama / Qwen3 directory (or our own diffusion export) as a checkpoint.

The model is built in this process at TP=1/PP=1 and saved with megatron-core's dist_checkpointing,
which is layout-free: the checkpoint loads at any TP/PP.  Layout of `--save DIR`:

    DIR/iter_0000000/   dist_checkpointing shards of the model only + megatron_dataeff.json
    DIR/latest_checkpointed_iteration.txt

`megatron_dataeff.json` has the keys training checkpoints have, with iteration 0, no scheduler
state and `"model_only": true` (there is no optimizer state).

Tokenizer: our own exports name theirs in config.json (ByteTokenizer and NullTokenizer are
restored as such); otherwise a directory with tokenizer files is recorded as
HuggingFaceTokenizer with the HF directory as `tokenizer_model`; a directory without one is
imported model-only with a NullTokenizer whose ids are the embedding rows (written as numbers; its
EOD is the last row; the mask token is then one id past them, which adds padded rows).

Vocabulary: the embedding keeps the HF rows exactly when the ids in use (tokenizer + mask token) fit
in them: `make_vocab_size_divisible_by` is chosen so that the padded size is the HF `vocab_size`
(128 when that works, else the HF size itself).  Otherwise rows are added (initialised to the mean
embedding) up to the next multiple of 128.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from megatron.core import dist_checkpointing

from megatron_dataeff.checkpoint.format import checkpoint_name, checkpoint_versions, latest_marker, publish_checkpoint
from megatron_dataeff.checkpoint.storage import write_model_tensors
from megatron_dataeff.config import (CheckpointConfig, DataConfig, ModelConfig, ObjectiveConfig, ParallelConfig,
                                     RunConfig, padded_vocab_size)
from megatron_dataeff.data.tokenizers import build_tokenizer, resolve_mask_token, tokenizer_from_metadata
from megatron_dataeff.distributed import initialize
from megatron_dataeff.errors import DataError, OutputExistsError, PathNotFoundError
from megatron_dataeff.export.hf_mapping import (ModelShape, UnsupportedModelError, check_hf_names, hf_tensor_for,
                                                megatron_checkpoint_key, megatron_shapes, read_hf_config)
from megatron_dataeff.export.safetensors_io import SafetensorsDirectory
from megatron_dataeff.models.builder import build_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_hf_dir_config(hf_dir: str) -> tuple[dict, dict]:
    """(raw config.json, checked model fields) of an HF directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise PathNotFoundError(f"--hf-dir {hf_dir}: no config.json")
    with open(path) as f:
        try:
            raw = json.load(f)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise DataError(f"--hf-dir {hf_dir}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"--hf-dir {hf_dir}: config.json is not a JSON object")
    model_type = raw.get("model_type")
    if model_type == "dataeff_mdm":
        from megatron_dataeff.export.configuration_dataeff_mdm import DataEffMDMConfig

        full = DataEffMDMConfig.from_pretrained(hf_dir).to_dict()
    elif model_type in ("llama", "qwen3"):
        from transformers import AutoConfig

        full = AutoConfig.from_pretrained(hf_dir).to_dict()
    else:
        raise UnsupportedModelError(f"--hf-dir {hf_dir}: model_type {model_type!r} is not supported "
                                    "(llama, qwen3, dataeff_mdm)")
    return raw, read_hf_config(full)


def _tokenizer_for(hf_dir: str, raw: dict, vocab_rows: int):
    recorded = (raw.get("megatron_dataeff") or {}).get("tokenizer") or {}
    if recorded.get("tokenizer_type") in ("ByteTokenizer", "NullTokenizer"):
        return tokenizer_from_metadata(recorded)
    if any(os.path.exists(os.path.join(hf_dir, f)) for f in _TOKENIZER_FILES):
        return build_tokenizer("HuggingFaceTokenizer", os.path.abspath(hf_dir))
    # Model only: ids are the embedding rows, written as numbers (NullTokenizer's EOD is its last id).
    tok = build_tokenizer("NullTokenizer", None, vocab_size=vocab_rows - 1)
    if tok.vocab_size != vocab_rows:  # a NullTokenizer whose vocab_size counts the EOD
        tok = build_tokenizer("NullTokenizer", None, vocab_size=vocab_rows)
    return tok


def choose_vocab_padding(vocab_ids: int, hf_rows: int, tp: int) -> tuple[int, int]:
    """(make_vocab_size_divisible_by, embedding rows): the HF rows exactly when possible."""
    if vocab_ids <= hf_rows:
        for d in (128, hf_rows):
            if d % tp == 0 and padded_vocab_size(vocab_ids, d) == hf_rows:
                return d, hf_rows
    d = 128 * tp // _gcd(128, tp)
    return d, padded_vocab_size(max(vocab_ids, hf_rows), d)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Keep the first rows; new rows get the mean row (a neutral start for an added token)."""
    if t.shape[0] >= rows:
        return t[:rows]
    extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
    return torch.cat([t, extra], 0)


def import_hf(hf_dir: str, save_dir: str, objective: str | None = None, tensor_model_parallel_size: int = 1,
              pipeline_model_parallel_size: int = 1, seq_length: int | None = None, log=print) -> str:
    """Convert `hf_dir` into a model-only checkpoint under `save_dir`; returns the iter_0000000 path."""
    raw, hf = read_hf_dir_config(hf_dir)
    if objective is None:
        objective = "mdm" if hf["model_type"] == "dataeff_mdm" else "ar"
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    tokenizer = _tokenizer_for(hf_dir, raw, hf["vocab_size"])
    mask_token_id, vocab_ids = resolve_mask_token(tokenizer)
    if raw.get("mask_token_id") is not None and raw["mask_token_id"] != mask_token_id:
        raise UnsupportedModelError(f"config.json's mask_token_id {raw['mask_token_id']} differs from the "
                                    f"tokenizer's ({mask_token_id})")
    divisible_by, rows = choose_vocab_padding(vocab_ids, hf["vocab_size"], tp)
    if rows != hf["vocab_size"]:
        log(f" note: embedding rows {hf['vocab_size']} -> {rows} (ids in use {vocab_ids}, mask token "
            f"{mask_token_id}); added rows start at the mean embedding")
    max_pos = hf["max_position_embeddings"]
    theta = hf["rope_theta"]
    model_cfg = ModelConfig(
        num_layers=hf["num_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["ffn_hidden_size"],
        num_attention_heads=hf["num_attention_heads"], num_query_groups=hf["num_query_groups"],
        kv_channels=hf["head_dim"], qk_layernorm=hf["qk_layernorm"],
        seq_length=seq_length or min(max_pos, 4096), max_position_embeddings=max_pos,
        rotary_base=int(theta) if float(theta).is_integer() else theta, norm_epsilon=hf["rms_norm_eps"],
        untie_embeddings_and_output_weights=not hf["tied"], make_vocab_size_divisible_by=divisible_by)
    tmeta = tokenizer.metadata()
    cfg = RunConfig(model=model_cfg, objective=ObjectiveConfig(name=objective),
                    data=DataConfig(tokenizer_type=tmeta["tokenizer_type"],
                                    tokenizer_model=getattr(tokenizer, "tokenizer_model", None),
                                    vocab_size=(tmeta.get("build_args") or tmeta).get("vocab_size")
                                    if tmeta["tokenizer_type"] == "NullTokenizer" else None),
                    parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                            device="cpu"),
                    checkpoint=CheckpointConfig(save=save_dir))
    cfg.validate_layout(tp * pp)  # the layout asked for must be able to load it

    shape = ModelShape(hf["num_layers"], hf["hidden_size"], hf["ffn_hidden_size"], hf["num_attention_heads"],
                       hf["num_query_groups"], hf["head_dim"], hf["vocab_size"], hf["qk_layernorm"], hf["tied"])
    # Written without building the model: each layer of each checkpoint key is made from its HF tensors only
    # when it is written, so the import holds one tensor and its HF parts (write_model_tensors).
    hf_tensors = SafetensorsDirectory(hf_dir)
    check_hf_names(hf_tensors.names, hf_tensors.get, shape)
    dtype = torch.float32  # the parameters' dtype in a training checkpoint (bf16 runs keep fp32 master copies)
    names, shapes = {}, {}
    for name, one in megatron_shapes(shape).items():
        key, layer = megatron_checkpoint_key(name)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            one = (rows,) + tuple(one[1:])
        names[(key, layer)] = name
        shapes[key] = ((shape.num_layers,) + tuple(one), dtype, True) if layer is not None else (tuple(one), dtype,
                                                                                                 False)

    def produce(key, layer):
        name = names[(key, layer)]
        t = hf_tensor_for(name, hf_tensors.get, shape)
        return _resize_rows(t, rows) if name in ("embedding.word_embeddings.weight", "output_layer.weight") else t

    build_cfg = copy.deepcopy(cfg)
    build_cfg.parallel.tensor_model_parallel_size = build_cfg.parallel.pipeline_model_parallel_size = 1
    initialize(1, 1, cfg.optim.seed, "cpu")
    _check_options(build_cfg, vocab_ids)
    meta = {
        "iteration": 0, "consumed_samples": 0, "epoch": 0.0, "scheduler": None,
        "config": cfg.to_dict(), "tokenizer": tmeta, "mask_token_id": mask_token_id, "vocab_ids": vocab_ids,
        "unique_tokens": None, "world_size": 1, "model_only": True, "written_by": checkpoint_versions(),
        "source": {"hf_dir": os.path.abspath(hf_dir), "model_type": hf["model_type"]},
    }
    return save_streamed_checkpoint(meta, save_dir, shapes, produce)


def _check_options(cfg, vocab_ids: int) -> None:
    """The imported model is one our builder makes: a one-layer model of its config builds (a config it cannot
    build is refused by name before anything is written)."""
    probe = copy.deepcopy(cfg)
    probe.model.num_layers = 1
    build_model(probe, min(vocab_ids, probe.model.make_vocab_size_divisible_by), "cpu", pre_process=True,
                post_process=True, initialize=False)


def _prepare_save(meta: dict, save_dir: str) -> tuple[int, str]:
    """(iteration, temporary directory) of a model-only checkpoint about to be written under save_dir."""
    iteration = int(meta["iteration"])
    latest = latest_marker(save_dir)
    if latest is not None and latest != str(iteration):
        raise OutputExistsError(f"--save {save_dir} already holds checkpoints up to iteration {latest}; choose an "
                                f"empty directory")
    tmp = os.path.join(save_dir, checkpoint_name(iteration)) + ".tmp"
    os.makedirs(save_dir, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return iteration, tmp


def save_streamed_checkpoint(meta: dict, save_dir: str, shapes: dict, produce) -> str:
    """A model-only checkpoint whose tensors `produce(key)` makes one at a time (`write_model_tensors`),
    published as save_model_checkpoint's are; returns its path."""
    iteration, tmp = _prepare_save(meta, save_dir)
    write_model_tensors(tmp, shapes, produce)
    return publish_checkpoint(save_dir, tmp, iteration, json.dumps(meta, indent=2))


def save_model_checkpoint(model, meta: dict, save_dir: str) -> str:
    """Save a TP=1 model (no optimizer) as SAVE_DIR/iter_N with our metadata; returns that path.

    Written under a temporary name and renamed, then the `latest` marker is written, as training
    checkpoints are.  Refuses a directory whose latest checkpoint is another iteration.
    """
    iteration, tmp = _prepare_save(meta, save_dir)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, tmp)
    return publish_checkpoint(save_dir, tmp, iteration, json.dumps(meta, indent=2))

