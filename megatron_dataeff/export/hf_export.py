"""Export a megatron_dataeff checkpoint (any TP/PP layout) as a Hugging Face model directory.

* objective ar (token dropout included): a stock architecture, LlamaForCausalLM, or
  Qwen3ForCausalLM when the model has QK RMSNorm; loads with no custom code.
* objective mdm: our own `configuration_dataeff_mdm.py` / `modeling_dataeff_mdm.py` are copied in,
  config.json carries `auto_map`, `mask_token_id` and `bidirectional: true`; load with
  `trust_remote_code=True`; `model.generate(...)` does masked-diffusion sampling.

Files: README.md (the model card: `model_card.py`), config.json, model.safetensors (or
model-0000k-of-0000n.safetensors + index above
`max_shard_size`), generation_config.json (AR), the tokenizer's HF form when it has one
(`hf_tokenizer.py`), and for mdm the two Python files.  config.json also records, under
`megatron_dataeff`, the objective, iteration, ids in use (`vocab_ids`; rows beyond are padding),
mask token and tokenizer.  The directory is written under a temporary name and renamed into place
at the end, so OUTPUT is either the previous export or the complete new one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import TYPE_CHECKING

import torch

from megatron_dataeff.atomic import publish_directory, temporary_name, write_text_atomic
from megatron_dataeff.checkpoint.reading import inference_config
from megatron_dataeff.checkpoint.storage import checkpoint_tensor_shapes, read_tensor_regions
from megatron_dataeff.distributed import initialize
from megatron_dataeff.errors import ConfigError, OutputExistsError
from megatron_dataeff.export.hf_mapping import (ModelShape, UnsupportedModelError, check_megatron_model,
                                                megatron_checkpoint_key, megatron_group_to_hf, megatron_groups,
                                                megatron_to_hf)
from megatron_dataeff.export.hf_tokenizer import save_hf_tokenizer
from megatron_dataeff.export.model_card import model_card
from megatron_dataeff.export.safetensors_io import write_safetensors
from megatron_dataeff.models.builder import build_model
from megatron_dataeff.objectives import objective_class

if TYPE_CHECKING:  # for annotations only
    from megatron.core.models.gpt import GPTModel

_HERE = os.path.dirname(os.path.abspath(__file__))
MDM_FILES = ("configuration_dataeff_mdm.py", "modeling_dataeff_mdm.py")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size) -> int:
    """Bytes of '2GB', '500MB', '1GiB' or an int."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    try:
        for unit in sorted(_UNITS, key=len, reverse=True):
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * _UNITS[unit])
        return int(text)
    except ValueError:
        raise ConfigError(f"--max-shard-size {size!r}: give a size such as 2GB, 500MB or 1GiB") from None


def export_checkpoint(load: str, output: str, iteration: int | None = None, dtype: str | None = None,
                      max_shard_size="2GB", view: str | None = None) -> str:
    """Export the checkpoint at `load` (a --save directory or one iter_N directory) to `output`; a dual-
    objective checkpoint as `view`: "ar" a stock causal LM, "mdm" the diffusion model.

    Streams: the weights are read from the checkpoint one layer at a time (any saved TP/PP layout, resharded
    by dist_checkpointing) and written shard by shard, so host memory holds about one output shard and one
    layer, never the model (benchmarks/bench_export_memory.py measures it)."""
    _check_output(output)
    ckpt, cfg, meta = inference_config(load, iteration, "cpu", view)
    if dtype is None:
        dtype = "bf16" if cfg.optim.bf16 else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    initialize(1, 1, cfg.optim.seed, "cpu")
    _check_options(cfg, meta)
    shape = ModelShape.from_run_config(cfg, cfg.model.vocab_rows(meta["vocab_ids"]))

    saved = checkpoint_tensor_shapes(ckpt)  # read once, not once a layer

    def tensors():
        for group in megatron_groups(shape):
            converted = megatron_group_to_hf(read_checkpoint_tensors(ckpt, group, shape.num_layers, saved), shape)
            for name, t in converted.items():
                yield name, t.to("cpu", DTYPES[dtype]).contiguous()

    return _write_export(cfg, meta, shape, dtype, tensors(), output, max_shard_size)


def export_model(model: GPTModel, cfg, meta: dict, output: str, dtype: str = "fp32", max_shard_size="2GB") -> str:
    """Export an in-process TP=1 megatron GPTModel with its RunConfig and checkpoint metadata."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_output(output)
    check_megatron_model(model, cfg.model.rotary_base)
    rows = model.embedding.word_embeddings.weight.shape[0]
    shape = ModelShape.from_run_config(cfg, rows)
    tensors = ((k, v.detach().to("cpu", DTYPES[dtype]).contiguous())
               for k, v in megatron_to_hf(model.state_dict(), shape).items())
    return _write_export(cfg, meta, shape, dtype, tensors, output, max_shard_size)


def _check_options(cfg, meta: dict) -> None:
    """check_megatron_model on a one-layer model of the checkpoint's config: the options (RoPE, norms,
    activation) are the model's, at the cost of one layer and a small embedding."""
    probe = copy.deepcopy(cfg)
    probe.model.num_layers = 1
    model = build_model(probe, min(meta["vocab_ids"], probe.model.make_vocab_size_divisible_by), "cpu",
                        pre_process=True, post_process=True, initialize=False)
    check_megatron_model(model, cfg.model.rotary_base)


def read_checkpoint_tensors(ckpt: str, names: list[str], num_layers: int, shapes: dict) -> dict[str, torch.Tensor]:
    """{megatron name: tensor} of some tensors of a checkpoint (e.g. one layer's), read without building the
    model or reading the rest: a layer's tensor is its slice of the key's layer-stacked tensor.  `shapes` is
    the checkpoint's `checkpoint_tensor_shapes`."""
    regions, keys = {}, {}
    for name in names:
        key, layer = megatron_checkpoint_key(name)
        if key not in shapes:
            raise UnsupportedModelError(f"{ckpt} has no {key} (for {name})")
        shape = shapes[key]
        if layer is None:
            regions[key] = ((0,) * len(shape), shape)
        else:
            if shape[0] != num_layers:
                raise UnsupportedModelError(f"{ckpt}: {key} has {shape[0]} layers, the config says {num_layers}")
            regions[key] = ((layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:]))
        keys[name] = (key, layer is not None)
    read = read_tensor_regions(ckpt, regions)
    return {name: read[key][0] if stacked else read[key] for name, (key, stacked) in keys.items()}


def _write_export(cfg, meta: dict, shape: ModelShape, dtype: str, tensors, output: str, max_shard_size) -> str:
    """Write the export directory from (HF name, tensor) pairs, under a temporary name, then publish it."""
    output = os.path.abspath(output)
    tmp = temporary_name(output)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        has_tokenizer = save_hf_tokenizer(meta["tokenizer"], tmp)
        record = _record(cfg, meta, has_tokenizer)
        if objective_class(cfg.objective).diffusion:
            architecture = _write_mdm_config(cfg, meta, shape, dtype, record, tmp)
        else:
            architecture = _write_ar_config(cfg, meta, shape, dtype, record, tmp)
        written = write_safetensors(tensors, tmp, parse_size(max_shard_size))
        card = model_card(cfg, meta, architecture=architecture,
                          trained_objective=record.get("trained_objective", cfg.objective.name),
                          num_parameters=written.num_parameters(shape.tied), has_tokenizer=has_tokenizer)
        write_text_atomic(os.path.join(tmp, "README.md"), card)
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


# ----------------------------------------------------------------------------------------------
# config.json / generation_config.json


def _record(cfg, meta: dict, has_tokenizer: bool) -> dict:
    tok = dict(meta["tokenizer"])
    tok["hf_tokenizer"] = has_tokenizer
    if not has_tokenizer:
        tok["note"] = (f"{tok.get('tokenizer_type')} has no Hugging Face form; token ids are those of "
                       "megatron_dataeff's tokenizer of this type")
    trained = meta.get("config", {}).get("objective", {}).get("name", cfg.objective.name)
    return {"objective": cfg.objective.name, **({"trained_objective": trained} if trained != cfg.objective.name else {}),
            "iteration": meta.get("iteration"),
            "vocab_ids": meta["vocab_ids"], "mask_token_id": meta["mask_token_id"], "tokenizer": tok,
            "note": "vocab_size is the padded embedding size; ids >= vocab_ids are padding, never sampled"}


def _suppressed_ids(meta: dict, rows: int) -> list[int]:
    """Ids generation must never produce: the padding rows and the mask token."""
    return sorted(set(range(meta["vocab_ids"], rows)) | {int(meta["mask_token_id"])})


def _common_fields(cfg, shape: ModelShape, dtype: str) -> dict:
    m = cfg.model
    return dict(vocab_size=shape.vocab_rows, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels,
                max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
                tie_word_embeddings=shape.tied, initializer_range=m.init_method_std,
                torch_dtype=DTYPES[dtype])  # transformers 5 stores it as `dtype`, 4.x as `torch_dtype`


def _write_ar_config(cfg, meta, shape: ModelShape, dtype: str, record: dict, out: str) -> str:
    from transformers import GenerationConfig, LlamaConfig, Qwen3Config

    eod = meta["tokenizer"].get("eod")
    fields = _common_fields(cfg, shape, dtype)
    fields.update(hidden_act="silu", attention_bias=False, rope_theta=float(cfg.model.rotary_base),
                  bos_token_id=None, eos_token_id=eod, pad_token_id=None)
    if shape.qk_layernorm:
        config, arch = Qwen3Config(**fields, use_sliding_window=False), "Qwen3ForCausalLM"
    else:
        config, arch = LlamaConfig(**fields, mlp_bias=False), "LlamaForCausalLM"
    config.architectures = [arch]
    config.megatron_dataeff = record
    config.save_pretrained(out)
    _add_legacy_rope_theta(out, cfg.model.rotary_base)
    gen = GenerationConfig(bos_token_id=None, eos_token_id=eod, pad_token_id=eod,
                           suppress_tokens=_suppressed_ids(meta, shape.vocab_rows))
    gen.save_pretrained(out)
    return arch


def _add_legacy_rope_theta(out: str, theta) -> None:
    # transformers 5 writes `rope_parameters`; 4.x reads `rope_theta`.  Both, so either reads the base.
    path = os.path.join(out, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.setdefault("rope_theta", float(theta))
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_mdm_config(cfg, meta, shape: ModelShape, dtype: str, record: dict, out: str) -> str:
    from megatron_dataeff.export.configuration_dataeff_mdm import DataEffMDMConfig

    eod = meta["tokenizer"].get("eod")
    config = DataEffMDMConfig(**_common_fields(cfg, shape, dtype), valid_vocab_size=meta["vocab_ids"],
                              rope_theta=float(cfg.model.rotary_base), qk_layernorm=shape.qk_layernorm,
                              mask_token_id=int(meta["mask_token_id"]), bidirectional=True,
                              block_size=cfg.objective.block_size,
                              eos_token_id=eod, pad_token_id=eod)
    config.architectures = ["DataEffMDMForMaskedLM"]
    config.auto_map = {"AutoConfig": "configuration_dataeff_mdm.DataEffMDMConfig",
                       "AutoModel": "modeling_dataeff_mdm.DataEffMDMForMaskedLM",
                       "AutoModelForMaskedLM": "modeling_dataeff_mdm.DataEffMDMForMaskedLM"}
    config.megatron_dataeff = record
    config.save_pretrained(out)
    for name in MDM_FILES:
        shutil.copyfile(os.path.join(_HERE, name), os.path.join(out, name))
    return config.architectures[0]




# ----------------------------------------------------------------------------------------------
# Weights and publication


def _check_output(output: str) -> None:
    """Refuse to replace a directory that is not an HF export (it might be anything)."""
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise OutputExistsError(f"--output {output} exists and is not a directory")
        if os.listdir(output) and not os.path.exists(os.path.join(output, "config.json")):
            raise OutputExistsError(f"--output {output} exists and is not an HF export (no config.json); "
                                  "refusing to replace it")


def _publish(tmp: str, output: str) -> None:
    _check_output(output)
    publish_directory(tmp, output)
