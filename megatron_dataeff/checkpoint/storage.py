"""Checkpoint storage: torch DCP / megatron-core dist_checkpointing reads and writes.

`load_sharded` is the one collective load (a sharded state dict fitted to what the checkpoint holds, so
transformer-engine's and the local layer spec's checkpoints load into each other); `read_tensor_regions` and
`write_model_tensors` read and write a checkpoint's tensors a region or a chunk at a time, for export and
import, without the model in memory.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject, ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_dataeff.checkpoint.format import CheckpointError


def checkpoint_keys(ckpt: str) -> set[str]:
    """The keys a torch_dist checkpoint holds (a sharded object's key without its `/shard_...` suffix)."""
    return {key.split("/shard_")[0] for key in storage_metadata(ckpt)}


def fit_request(request: dict, ckpt: str) -> dict:
    """`request` (a sharded state dict) as the checkpoint at `ckpt` can answer it.

    megatron-core's local layer spec stores its norms under transformer-engine's names
    (`input_layernorm.weight` as `self_attention.linear_qkv.layer_norm_weight`, ...), so the two specs'
    weights share their keys; what differs is the `_extra_state` objects (TE's FP8 bookkeeping, None in the
    local spec, and TE's core attention has one of its own).  An `_extra_state` the checkpoint lacks keeps the
    module's own value; any other missing key is refused here, by name, before any collective load."""

    keys = checkpoint_keys(ckpt)
    missing: list[str] = []

    def fit(node):
        if isinstance(node, dict):
            return {k: fit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fit(v) for v in node]
        if isinstance(node, ShardedObject) and node.key.endswith("_extra_state") and node.key not in keys:
            return LocalNonpersistentObject(node.data)
        if isinstance(node, (ShardedTensor, ShardedObject)) and node.key not in keys:
            missing.append(node.key)
        return node

    fitted = fit(request)
    if missing:
        shown = sorted(set(missing))
        raise CheckpointError(
            f"{ckpt} has no {', '.join(shown[:6])}{' ...' if len(shown) > 6 else ''} ({len(shown)} keys this model "
            f"needs): it holds another architecture (e.g. --qk-layernorm, --untie-embeddings-and-output-weights, "
            f"--num-layers) or another optimizer state")
    return fitted


def load_sharded(request: dict, ckpt: str, what: str) -> dict:
    """dist_checkpointing.load of `request` (fitted to the checkpoint: `fit_request`) from `ckpt`; any failure
    is a CheckpointError naming it."""

    request = fit_request(request, ckpt)
    try:
        return dist_checkpointing.load(request, ckpt)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"{ckpt}: cannot load {what} state: {type(exc).__name__}: {exc}") from exc


def read_tensor_regions(ckpt: str, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
                        ) -> dict[str, torch.Tensor]:
    """{key: tensor} of regions {key: (offsets, sizes)} of a checkpoint's saved tensors (e.g. one layer of a
    layer-stacked key), each in the dtype it was saved in, read by torch.distributed.checkpoint from the files
    that hold the region: nothing else of the checkpoint is read into memory.  (megatron-core's own load
    needs every fragment of a key to be asked for, across ranks.)"""

    class RegionPlanner(DefaultLoadPlanner):
        """Reads one region of each saved tensor into state_dict[key] (whose shape is the region's sizes)."""

        def create_local_plan(self):
            items = []
            for key, (offsets, sizes) in regions.items():
                chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]  # the region itself (its read items' offsets are relative to it)

    saved = storage_metadata(ckpt)
    missing = [key for key in regions if key not in saved]
    if missing:
        raise CheckpointError(f"{ckpt} has no {', '.join(missing)}")
    out = {key: torch.empty(sizes, dtype=saved[key].properties.dtype) for key, (_, sizes) in regions.items()}
    try:
        dcp.load(out, checkpoint_id=ckpt, planner=RegionPlanner(), no_dist=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"{ckpt}: cannot read {', '.join(regions)}: {type(exc).__name__}: {exc}") from exc
    return out


def checkpoint_tensor_shapes(ckpt: str) -> dict[str, tuple[int, ...]]:
    """{key: global shape} of the tensors a torch_dist checkpoint holds."""

    return {key: tuple(md.size) for key, md in storage_metadata(ckpt).items()
            if isinstance(md, TensorStorageMetadata)}


def write_model_tensors(tmp: str, shapes: dict, produce) -> None:
    """A model-only torch_dist checkpoint in the empty directory `tmp`, written without the model in memory.

    `shapes[key]` = (global shape, dtype, layer-stacked); `produce(key, layer)` makes one chunk only when it is
    written: a layer-stacked key's layer `layer` (shape without the layer axis), or a whole key (layer None).
    The chunks are laid out as megatron-core lays out its own (one per layer of a stacked key), so its load
    reshards them into any TP/PP layout; the modules' `_extra_state` objects are absent (a load keeps the
    module's own: `fit_request`)."""

    items = []
    for key, (shape, dtype, stacked) in shapes.items():
        chunks = ([((i,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:])) for i in range(shape[0])] if stacked
                  else [((0,) * len(shape), tuple(shape))])
        for offsets, sizes in chunks:
            items.append(WriteItem(
                index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                            properties=TensorProperties(dtype=dtype), size=torch.Size(shape))))

    class ChunkPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            key, offsets = write_item.index.fqn, write_item.index.offset
            shape, dtype, stacked = shapes[key]
            tensor = produce(key, offsets[0] if stacked else None)
            want = tuple(shape[1:]) if stacked else tuple(shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{key}: made {tuple(tensor.shape)}, declared {want}")
            tensor = tensor.to(dtype).contiguous()
            return tensor.unsqueeze(0) if stacked else tensor

    writer = dcp.FileSystemWriter(tmp, thread_count=1, single_file_per_rank=True)
    placeholder = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype, _) in shapes.items()}
    dcp.save(placeholder, storage_writer=writer, planner=ChunkPlanner(flatten_state_dict=False), no_dist=True)
    torch.save({}, os.path.join(tmp, "common.pt"))  # the (empty) common state of a model-only checkpoint
    save_config(CheckpointingConfig("torch_dist"), tmp)


def storage_metadata(ckpt: str) -> dict:

    try:
        return FileSystemReader(ckpt).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: cannot read its .metadata: {type(exc).__name__}: {exc}") from exc
