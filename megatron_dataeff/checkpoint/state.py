"""Save and load the state a client hands in: model, optimizer and RNG shards, plus the client's metadata.

torchtitan's CheckpointManager is the model: the caller passes its model, its optimizer (or none, for the
weights alone), where its shards sit (`Placement`) and the metadata to keep beside them; this module knows the
format (`format.py`) and the storage (`storage.py`), not who calls it.  The trainer keeps its position in the run
as a `TrainState` in that metadata.

A save is collective: every rank calls it.  With `async_queue` (megatron-core's AsyncCallsQueue,
`--async-save`) the shards are written by a forked process after the state is staged, and the checkpoint is
published by the queue's finalisation once every rank's writer is done.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_dataeff.checkpoint.format import checkpoint_name, prune, publish_checkpoint
from megatron_dataeff.checkpoint.storage import load_sharded


@dataclass(frozen=True)
class Placement:
    """Where this process's shards of the state sit."""

    layout: tuple[int, int, int]  # (pipeline, tensor, data)-parallel sizes
    coordinates: tuple[int, int, int]  # this process's (pp, tp, dp) ranks
    device: str  # "cpu" or "cuda": whose generators the RNG states are

    def record(self) -> dict:
        """{"pp", "tp", "dp"}: the layout as checkpoint metadata records it."""
        return dict(zip(("pp", "tp", "dp"), self.layout))


@dataclass
class TrainState:
    """The position in a run that a checkpoint keeps beside the weights."""

    iteration: int = 0  # optimizer steps taken
    consumed_samples: int = 0  # training samples consumed (the data stream's position)
    validation: dict = field(default_factory=dict)  # {"last": record, "best": record} of the run's validations

    @classmethod
    def from_metadata(cls, meta: dict) -> "TrainState":
        return cls(int(meta.get("iteration", 0)), int(meta.get("consumed_samples", 0)),
                   dict(meta.get("validation") or {}))


def _rng_object(placement: Placement) -> ShardedObject:
    """Every generator a rank draws from (dropout), as one sharded object per rank."""
    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if placement.device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, placement.layout, placement.coordinates, replica_id=0)


def _restore_rng(state: dict, device: str) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_state(model, optimizer, placement: Placement, *, is_loading: bool, with_rng: bool = True) -> dict:
    """The sharded state dict of (model, optimizer or None, RNG) as megatron-core saves and loads it.

    'fully_reshardable': the distributed optimizer's state is stored per parameter, in model space, so a
    checkpoint loads at any TP/PP/DP layout (a loading distributed optimizer must have its Adam state
    materialised first: `training.optimizer.materialise_adam_state`)."""
    model_sd = model.sharded_state_dict()
    out = {"model": model_sd}
    if with_rng:
        out["rng_state"] = _rng_object(placement)
    if optimizer is not None:
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return out


def save(save_dir: str, iteration: int, model, optimizer, metadata: dict, placement: Placement, *,
         keep_last: int | None = None, async_queue=None, print_fn=print) -> str:
    """Save (model, optimizer, RNG) and `metadata` as SAVE_DIR/iter_N (collective); returns its path.

    The metadata is serialised now, so it describes the state that was staged even when the shards are
    written in the background."""
    rank = dist.get_rank()
    final = os.path.join(save_dir, checkpoint_name(iteration))
    tmp = final + ".tmp"
    start = time.time()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    request = dist_checkpointing.save(sharded_state(model, optimizer, placement, is_loading=False), tmp,
                                      async_sharded_save=async_queue is not None)
    publish = functools.partial(_publish, save_dir, tmp, iteration, json.dumps(metadata, indent=2), keep_last,
                                print_fn, start)
    if request is None:
        dist.barrier()
        publish()
    else:
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
        print_fn(f" checkpoint of iteration {iteration}: writing {tmp} in the background "
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
            prune(save_dir, keep_last)
        print_fn(f" saved checkpoint {final} ({time.time() - start:.2f} s)")
    dist.barrier()


def load(ckpt: str, meta: dict, model, optimizer, placement: Placement) -> bool:
    """Load the model (and the optimizer, unless None) of the checkpoint `ckpt` whose metadata is `meta`, and
    its RNG states when they were saved at this layout on this kind of device (dropout masks then continue
    exactly; otherwise the generators keep their seeding).  Returns whether the RNG states were restored."""
    with_rng = (optimizer is not None and meta.get("layout") == placement.record()
                and meta.get("device", placement.device) == placement.device)
    request = sharded_state(model, optimizer, placement, is_loading=True, with_rng=with_rng)
    state = load_sharded(request, ckpt, "model/optimizer" if optimizer is not None else "model")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if with_rng:
        _restore_rng(state["rng_state"], placement.device)
    return with_rng
