"""Checkpoints: megatron-core `dist_checkpointing` (torch_dist) of model + optimizer, plus our metadata.

Layout of `--save DIR`:

    DIR/iter_0000100/            one checkpoint: dist_checkpointing shards + megatron_dataeff.json
    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint's iteration

A checkpoint is written under a temporary name (`iter_0000100.tmp`), published by a rename once
every rank has finished, and only then is the `latest` marker replaced (write + rename).  A
process killed during a save leaves the previous checkpoint as `latest`.  `megatron_dataeff.json`
holds the iteration, the sample position, the scheduler state, the run config and the tokenizer /
mask-token metadata as plain JSON.  With `--async-save` the shards are written by a background process
and the same publication (metadata, rename, `latest`) runs once every rank's writer has finished.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_dataeff.atomic import publish_directory, write_text_atomic
from megatron_dataeff.errors import UserError

if TYPE_CHECKING:  # for annotations only
    import torch

LATEST = "latest_checkpointed_iteration.txt"
METADATA = "megatron_dataeff.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path and what is wrong."""


def checkpoint_name(iteration: int) -> str:
    """Directory name of the checkpoint of an iteration."""
    return f"iter_{iteration:07d}"


def _layout(trainer) -> list[int]:
    p = trainer.cfg.parallel
    return [p.pipeline_model_parallel_size, p.tensor_model_parallel_size, trainer.dp_size]


def _rng_object(trainer):
    """Every generator a rank draws from (dropout), as one sharded object per rank."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    rt = trainer.runtime
    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if rt.device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, tuple(_layout(trainer)), (rt.pp_rank, rt.tp_rank, rt.dp_rank),
                         replica_id=0)


def _restore_rng(trainer, state) -> None:
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and trainer.runtime.device == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(trainer, is_loading: bool, with_optimizer: bool = True, with_rng: bool = True) -> dict:
    if is_loading and with_optimizer and trainer.cfg.parallel.use_distributed_optimizer:
        from megatron_dataeff.training.optimizer import materialise_adam_state

        materialise_adam_state(trainer.optimizer)
    model_sd = trainer.model[0].module.sharded_state_dict()
    out = {"model": model_sd}
    if with_rng:
        out["rng_state"] = _rng_object(trainer)
    if not with_optimizer:
        return out
    # 'fully_reshardable': the distributed optimizer's state is stored per parameter, in model space,
    # so a checkpoint loads at any TP/PP/DP layout.
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    out["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return out


def _metadata(trainer) -> dict:
    """What a checkpoint's megatron_dataeff.json holds: the run's facts (the ones run.json has too), the
    position in the run and the schedule."""
    return {
        **trainer.run_facts(),
        "iteration": trainer.iteration,
        "consumed_samples": trainer.consumed_samples,
        "epoch": trainer.data.epoch_of(trainer.consumed_samples),
        "scheduler": trainer.scheduler.state_dict(),
        "schedule": trainer.schedule,
        "validation": trainer.validation,
        "device": trainer.runtime.device,  # the RNG states are this device's generators
        "model_only": False,
    }


def checkpoint_versions() -> dict:
    """The versions recorded with a run and in its checkpoints (`written_by`)."""
    import megatron.core
    import torch

    import megatron_dataeff

    return {"megatron_dataeff": megatron_dataeff.__version__, "megatron_core": megatron.core.__version__,
            "torch": torch.__version__}


def layout_of(trainer) -> dict:
    """{"pp", "tp", "dp"}: the parallel layout a run's state is sharded in."""
    return dict(zip(("pp", "tp", "dp"), _layout(trainer)))


def save(trainer, save_dir: str, async_queue=None) -> str:
    """Save the trainer's state as DIR/iter_N (collective: every rank calls it).

    With `async_queue` (megatron-core's AsyncCallsQueue, `--async-save`) the shards are written by a
    forked process after the state is staged, and the checkpoint is published by the queue's finalisation
    once every rank's writer is done; otherwise it is written and published before this returns.  Either
    way the metadata is taken now, so it describes the state that was staged."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = os.path.join(save_dir, checkpoint_name(trainer.iteration))
    tmp = final + ".tmp"
    start = time.time()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    request = dist_checkpointing.save(_sharded_state(trainer, is_loading=False), tmp,
                                      async_sharded_save=async_queue is not None)
    publish = functools.partial(_publish, save_dir, tmp, trainer.iteration,
                                json.dumps(_metadata(trainer), indent=2), trainer.cfg.checkpoint.keep_last,
                                trainer.log.print, start)
    if request is None:
        dist.barrier()
        publish()
    else:
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
        trainer.log.print(f" checkpoint of iteration {trainer.iteration}: writing {tmp} in the background "
                          f"(training held {time.time() - start:.2f} s)")
    return final


def _publish(save_dir: str, tmp: str, iteration: int, metadata: str, keep_last: int | None, print_fn,
             start: float) -> None:
    """Every rank's shards are in `tmp`: rank 0 publishes it as iter_N (collective: every rank calls it)."""
    dist.barrier()
    # Fault-injection hook for the kill-during-save tests ("ITERATION:SECONDS"): the shards of that
    # iteration are written but not yet published when the process sleeps.
    hook = os.environ.get("MEGATRON_DATAEFF_TEST_SAVE_PAUSE", "")
    if hook and int(hook.split(":")[0]) == iteration:
        time.sleep(float(hook.split(":")[1]))
    if dist.get_rank() == 0:
        final = publish_checkpoint(save_dir, tmp, iteration, metadata)
        if keep_last:
            _prune(save_dir, keep_last)
        print_fn(f" saved checkpoint {final} ({time.time() - start:.2f} s)")
    dist.barrier()


def publish_checkpoint(save_dir: str, tmp: str, iteration: int, metadata: str) -> str:
    """(one process) Add our metadata to the finished checkpoint directory `tmp`, rename it to
    SAVE_DIR/iter_N, then point the `latest` marker at it; returns iter_N's path."""
    final = os.path.join(save_dir, checkpoint_name(iteration))
    write_text_atomic(os.path.join(tmp, METADATA), metadata)
    publish_directory(tmp, final)
    write_text_atomic(os.path.join(save_dir, LATEST), str(iteration))
    return final


def _prune(save_dir: str, keep: int) -> None:
    iters = sorted(int(d[5:]) for d in os.listdir(save_dir) if d.startswith("iter_") and d[5:].isdigit())
    for it in iters[:-keep]:
        shutil.rmtree(os.path.join(save_dir, checkpoint_name(it)), ignore_errors=True)


def latest_iteration(load_dir: str) -> int:
    """The iteration named by DIR's `latest` marker."""
    marker = os.path.join(load_dir, LATEST)
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    if not os.path.exists(marker):
        raise CheckpointError(f"--load {load_dir}: no {LATEST} (no complete checkpoint was saved there)")
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)


def read_metadata(ckpt_dir: str) -> dict:
    """Our JSON metadata of one checkpoint directory."""
    from megatron_dataeff.training.megatron_lm import is_megatron_lm_checkpoint

    path = os.path.join(ckpt_dir, METADATA)
    if not os.path.exists(path) and is_megatron_lm_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is a Megatron-LM checkpoint: pretrain_diffusion.py --load reads its "
                              f"weights (and starts at iteration 0); save that run to evaluate or export it")
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt_dir}: missing {METADATA}; neither a complete megatron_dataeff checkpoint nor "
                              f"a Megatron-LM one (no `args` in its common state)")
    with open(path) as f:
        return json.load(f)


def check_compatible(ckpt: str, meta: dict, trainer) -> None:
    """Refuse a checkpoint whose model shape or vocabulary differs from this run's, naming the fields."""
    from megatron_dataeff.config import weight_shape_fields

    saved = meta.get("config", {}).get("model", {})
    now = trainer.cfg.to_dict()["model"]
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {now[k]!r}"
             for k in weight_shape_fields() if k in saved and saved.get(k) != now[k]]
    if meta.get("vocab_ids") != trainer.vocab_ids:
        diffs.append(f"vocabulary ids: checkpoint {meta.get('vocab_ids')}, this run {trainer.vocab_ids} "
                     f"(--tokenizer-type/--tokenizer-model)")
    if diffs:
        raise CheckpointError(f"{ckpt} does not fit this model:\n  " + "\n  ".join(diffs))


def check_checkpoint_files(ckpt: str, meta: dict) -> None:
    """The files dist_checkpointing needs, present (before any collective work).

    megatron-core up to 0.18 writes the common state to `common.pt` and needs it to load; 0.19 keeps it
    inside the shards (and reads both), so a 0.19 checkpoint is refused by earlier releases, by name.
    """
    import megatron.core
    from packaging.version import Version

    missing = [f for f in ("metadata.json", ".metadata") if not os.path.exists(os.path.join(ckpt, f))]
    shards = [f for f in os.listdir(ckpt) if f.endswith(".distcp")]
    if not shards:
        missing.append("*.distcp shards")
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")
    installed = megatron.core.__version__
    if not os.path.exists(os.path.join(ckpt, "common.pt")) and Version(installed).release < (0, 19):
        writer = meta.get("written_by", {}).get("megatron_core", ">= 0.19")
        raise CheckpointError(f"{ckpt} was written by megatron-core {writer} (no common.pt); megatron-core "
                              f"{installed}, installed here, cannot read it: install megatron-core >= 0.19")


def checkpoint_keys(ckpt: str) -> set[str]:
    """The keys a torch_dist checkpoint holds (a sharded object's key without its `/shard_...` suffix)."""
    return {key.split("/shard_")[0] for key in _storage_metadata(ckpt)}


def fit_request(request: dict, ckpt: str) -> dict:
    """`request` (a sharded state dict) as the checkpoint at `ckpt` can answer it.

    megatron-core's local layer spec stores its norms under transformer-engine's names
    (`input_layernorm.weight` as `self_attention.linear_qkv.layer_norm_weight`, ...), so the two specs'
    weights share their keys; what differs is the `_extra_state` objects (TE's FP8 bookkeeping, None in the
    local spec, and TE's core attention has one of its own).  An `_extra_state` the checkpoint lacks keeps the
    module's own value; any other missing key is refused here, by name, before any collective load."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject, ShardedTensor

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
    from megatron.core import dist_checkpointing

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
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

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

    saved = _storage_metadata(ckpt)
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
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: tuple(md.size) for key, md in _storage_metadata(ckpt).items()
            if isinstance(md, TensorStorageMetadata)}


def write_model_tensors(tmp: str, shapes: dict, produce) -> None:
    """A model-only torch_dist checkpoint in the empty directory `tmp`, written without the model in memory.

    `shapes[key]` = (global shape, dtype, layer-stacked); `produce(key, layer)` makes one chunk only when it is
    written: a layer-stacked key's layer `layer` (shape without the layer axis), or a whole key (layer None).
    The chunks are laid out as megatron-core lays out its own (one per layer of a stacked key), so its load
    reshards them into any TP/PP layout; the modules' `_extra_state` objects are absent (a load keeps the
    module's own: `fit_request`)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

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


def _storage_metadata(ckpt: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(ckpt).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: cannot read its .metadata: {type(exc).__name__}: {exc}") from exc


def load(trainer, load_dir: str, iteration: int | None = None, finetune: bool = False) -> dict:
    """Restore model, optimizer, scheduler and RNG state from DIR (its latest checkpoint by default).

    `finetune` (or a model-only checkpoint, e.g. imported from Hugging Face, or a Megatron-LM checkpoint:
    `megatron_lm.load_weights`) loads the weights only and starts at iteration 0 with a fresh optimizer.  RNG states are restored when the layout is
    the one they were saved at, on the same kind of device (dropout masks then continue exactly); otherwise
    they are reseeded.  A checkpoint of transformer-engine's layer spec loads into the local spec and back
    (`fit_request`), so a GPU run with TE resumes, or is evaluated, on a CPU or a GPU without TE.
    """
    from megatron_dataeff.training import megatron_lm

    ckpt = resolve_checkpoint(load_dir, iteration)
    if megatron_lm.is_megatron_lm_checkpoint(ckpt):
        return megatron_lm.load_weights(trainer, ckpt)
    meta = read_metadata(ckpt)
    check_compatible(ckpt, meta, trainer)
    check_checkpoint_files(ckpt, meta)
    model_only = finetune or meta.get("model_only", False)
    same_layout = (meta.get("layout") == layout_of(trainer)
                   and meta.get("device", trainer.runtime.device) == trainer.runtime.device)
    with_rng = same_layout and not model_only
    request = _sharded_state(trainer, is_loading=True, with_optimizer=not model_only, with_rng=with_rng)
    state = load_sharded(request, ckpt, "model" if model_only else "model/optimizer")
    trainer.model[0].module.load_state_dict(state["model"])
    if model_only:
        trainer.log.print(f" loaded weights of {ckpt} (model only: iteration 0, fresh optimizer)")
        return {**meta, "iteration": 0, "consumed_samples": 0}
    trainer.optimizer.load_state_dict(state["optimizer"])
    load_schedule(trainer, ckpt, meta)
    if with_rng:
        _restore_rng(trainer, state["rng_state"])
    trainer.log.print(f" loaded checkpoint {ckpt} (iteration {meta['iteration']}, epoch {meta['epoch']:.2f}"
                      f"{'' if with_rng else ', saved at another layout or device: RNG reseeded'})")
    return meta


def check_schedule(trainer, ckpt: str, meta: dict) -> list[str]:
    """The schedule differences between a checkpoint and this run; an error unless the command line says
    which to follow (Megatron-LM's --override-opt-param-scheduler / --use-checkpoint-opt-param-scheduler)."""
    from megatron_dataeff.training.optimizer import schedule_differences, schedule_from_scheduler_state

    saved = meta.get("schedule") or schedule_from_scheduler_state(meta.get("scheduler", {}))
    diffs = schedule_differences(saved, trainer.schedule, trainer.cfg)
    ck = trainer.cfg.checkpoint
    if diffs and not (ck.override_opt_param_scheduler or ck.use_checkpoint_opt_param_scheduler):
        raise CheckpointError(
            f"{ckpt}: its schedule differs from this command line's:\n  " + "\n  ".join(diffs) +
            "\npass --override-opt-param-scheduler to follow the command line (e.g. to extend the run) or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")
    return diffs


def load_schedule(trainer, ckpt: str, meta: dict) -> None:
    """Continue the schedule at the checkpoint's step, following the command line or the checkpoint."""
    from megatron_dataeff.training.optimizer import build_scheduler

    diffs = check_schedule(trainer, ckpt, meta)
    if diffs and trainer.cfg.checkpoint.use_checkpoint_opt_param_scheduler and meta.get("schedule"):
        trainer.schedule = dict(meta["schedule"])
        trainer.scheduler = build_scheduler(trainer.cfg, trainer.optimizer, trainer.train_iters, trainer.schedule)
    elif diffs and trainer.cfg.checkpoint.use_checkpoint_opt_param_scheduler:
        trainer.scheduler.override_opt_param_scheduler = False
        trainer.scheduler.use_checkpoint_opt_param_scheduler = True
    trainer.scheduler.load_state_dict(meta["scheduler"])
    if diffs:
        which = ("the checkpoint's" if trainer.cfg.checkpoint.use_checkpoint_opt_param_scheduler
                 else "this command line's")
        trainer.log.print(f" schedule: following {which} where they differ ({'; '.join(diffs)})")


def resolve_checkpoint(path: str, iteration: int | None = None) -> str:
    """A checkpoint directory from a `--save` directory (latest or given iteration; Megatron-LM's `release`
    marker too) or itself."""
    from megatron_dataeff.training.megatron_lm import RELEASE, is_megatron_lm_checkpoint

    if os.path.exists(os.path.join(path, METADATA)) or is_megatron_lm_checkpoint(path):
        return path
    marker = os.path.join(path, LATEST)
    if iteration is None and os.path.exists(marker) and open(marker).read().strip() == RELEASE:
        if not os.path.isdir(os.path.join(path, RELEASE)):
            raise CheckpointError(f"{marker} says {RELEASE}, but {os.path.join(path, RELEASE)} is missing")
        return os.path.join(path, RELEASE)
    if iteration is None:
        iteration = latest_iteration(path)
    ckpt = os.path.join(path, checkpoint_name(iteration))
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{path}: no checkpoint for iteration {iteration} ({ckpt} is missing)")
    return ckpt
