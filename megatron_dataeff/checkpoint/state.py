"""Save and load the state a client hands in: model, optimizer and RNG shards, plus the client's metadata.

torchtitan's CheckpointManager is the model: the caller passes its model, its optimizer (or none, for the
weights alone), where its shards sit (`Placement`) and the metadata to keep beside them; this module knows the
format (`format.py`) and the storage (`storage.py`), not who calls it.  The trainer keeps its position in the run
as a `TrainState` in that metadata.

A save is collective: every rank calls it.  With `async_queue` (`--async-save`: megatron-core's or NVRx's queue,
`async_save.open_queue`) the shards are written by a background process after the state is staged, and the
checkpoint is published by the queue's finalisation once every rank's writer is done.
"""

from __future__ import annotations

import builtins
import errno
import functools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_dataeff.checkpoint.format import (FILES, LATEST, METADATA, CheckpointError, CheckpointSaveError,
                                                checkpoint_iterations, checkpoint_name, file_problems, file_record,
                                                is_megatron_lm_checkpoint, latest_iteration, latest_marker, prune,
                                                publish_checkpoint, read_metadata, resolve_checkpoint)
from megatron_dataeff.checkpoint.async_save import quiet_deprecation, save_kwargs
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
    written in the background; at publication it gains the manifest of the files (size and CRC-32 of each),
    which a load checks (`intact_checkpoint`).  A write that fails (a full disk), here or in the background writer,
    removes the partial directory, leaves the previous checkpoint `latest` and raises CheckpointSaveError naming
    the path and the free space (a background save's at the `async_queue` finalisation that finds it failed)."""
    rank = dist.get_rank()
    final = os.path.join(save_dir, checkpoint_name(iteration))
    tmp = final + ".tmp"
    start = time.time()
    error = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            need, free = _previous_size(save_dir), shutil.disk_usage(save_dir).free
            if need and free < need:  # refused before a byte is written: the last one's size, at least
                raise OSError(errno.ENOSPC, f"{need / 2**20:,.1f} MiB needed (the previous checkpoint's size)")
            os.makedirs(tmp)
        except OSError as exc:
            error = exc
    _agreed(error, save_dir, tmp)
    quiet_deprecation()
    try:  # torch DCP gathers a failure on any rank into a CheckpointException raised on every rank
        request = dist_checkpointing.save(sharded_state(model, optimizer, placement, is_loading=False), tmp,
                                          async_sharded_save=async_queue is not None, **save_kwargs(async_queue))
    except BaseException as exc:
        _failed_save(exc, save_dir, tmp)
    publish = functools.partial(_publish, save_dir, tmp, iteration, json.dumps(metadata, indent=2), keep_last,
                                print_fn, start)
    if request is None:
        dist.barrier()
        publish()
    else:
        # megatron-core's finalisation (its writers' results, .metadata) and ours run as one, so that a writer's
        # failure is a failed save like a synchronous one
        finalize = functools.partial(_finalize_background_save, [*request.finalize_fns, publish], save_dir, tmp)
        async_queue.schedule_async_request(request._replace(finalize_fns=[finalize]))
        print_fn(f" checkpoint of iteration {iteration}: writing {tmp} in the background "
                 f"(training held {time.time() - start:.2f} s)")
    return final


def _finalize_background_save(finalize_fns: list, save_dir: str, tmp: str) -> None:
    """Publish a background save once every rank's writer is done (collective).  A writer that failed (a full
    disk) makes megatron-core's finalisation raise on every rank, with the writers' errors on rank 0 only: rank 0's
    file-system error, agreed by all, is handled as a synchronous save's (`_failed_save`)."""
    try:
        for fn in finalize_fns:
            fn()
    except (KeyboardInterrupt, SystemExit, CheckpointSaveError):  # ours: already agreed and cleaned up
        raise
    except BaseException as exc:
        _agreed(_os_error(exc, save_dir) if dist.get_rank() == 0 else None, save_dir, tmp)
        raise


def _previous_size(save_dir: str) -> int:
    """Bytes of the newest checkpoint under `save_dir` (0 when there is none)."""
    iterations = checkpoint_iterations(save_dir)
    if not iterations:
        return 0
    ckpt = os.path.join(save_dir, checkpoint_name(iterations[-1]))
    return sum(os.path.getsize(os.path.join(ckpt, name)) for name in os.listdir(ckpt))


def _os_error(exc: BaseException, save_dir: str) -> OSError | None:
    """The file-system error behind a failed write: the exception itself, or an OSError a torch DCP
    CheckpointException gathered from a rank (a background writer's reaches rank 0 as text: megatron-core 0.16's
    "Worker failure: [Errno 28] ...", later releases' "... error: <class 'OSError'>"); or, when the writer's own
    message hides it (torch's serialiser reports a short write as "unexpected pos"), a full file system seen now
    (under 1 MiB free, less than the previous checkpoint's size, or no free inodes)."""
    if isinstance(exc, OSError):
        return exc
    failures = getattr(exc, "failures", {}) or {}
    named = None  # an OSError known by its type alone
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, OSError):
            return inner
        told = re.search(r"\[Errno (\d+)\] ([^:]+)", str(inner))
        if told:
            return OSError(int(told.group(1)), told.group(2))
        typed = re.search(r"<class '(\w+)'>", str(inner))
        if typed and isinstance(getattr(builtins, typed.group(1), None), type) \
                and issubclass(getattr(builtins, typed.group(1)), OSError):
            named = named or OSError(None, f"{typed.group(1)} in the background writer: its message is logged above")
    try:
        free, inodes = shutil.disk_usage(save_dir).free, os.statvfs(save_dir)
    except OSError:
        return named
    no_inodes = bool(inodes.f_files and not inodes.f_favail)
    if free < max(2**20, _previous_size(save_dir)) or no_inodes:
        return OSError(errno.ENOSPC, f"no space left{' (no free inodes)' if no_inodes else ''}: "
                                     f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}")
    return named


def _agreed(error: OSError | None, save_dir: str, tmp: str) -> None:
    """Rank 0's file-system error (or None), raised on every rank alike (collective), so none waits for the
    others at the next barrier."""
    box = [None if error is None else (error.errno, error.strerror or str(error))]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        _failed_save(OSError(*box[0]), save_dir, tmp, collective=True)


def _failed_save(exc: BaseException, save_dir: str, tmp: str, collective: bool = False):
    """Turn a write that failed for lack of space (or any OSError) into one clear error, without the partial
    directory; anything else is a bug and propagates as it is.  `collective`: every rank is here (an agreed
    error): rank 0 has removed the partial directory before it raises, and the error is marked `agreed`, so rank 0
    alone reports it and no rank exits before it has (`entry.report_user_error`)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    error = _os_error(exc, save_dir)
    if error is None:
        raise exc
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(save_dir).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    try:
        previous = f"iteration {latest_iteration(save_dir)} stays the latest checkpoint"
    except CheckpointError:
        previous = "no earlier checkpoint there"
    failed = CheckpointSaveError(f"--save {save_dir}: cannot write {os.path.basename(tmp)} "
                                 f"({error.strerror or error}); {free}; {previous}")
    failed.agreed = collective
    raise failed from exc


def _manifest(tmp: str, rank: int) -> dict:
    """Size and CRC-32 of the files this rank wrote into `tmp` (torch DCP's `__RANK_*` shards; rank 0 also the
    common files)."""
    names = sorted(os.listdir(tmp))
    mine = [n for n in names if n.startswith(f"__{rank}_") or (rank == 0 and not n.startswith("__") and n != METADATA)]
    return {n: file_record(os.path.join(tmp, n)) for n in mine}


def _publish(save_dir: str, tmp: str, iteration: int, metadata: str, keep_last: int | None, print_fn,
             start: float) -> None:
    """Every rank's shards are in `tmp`: each rank records its files, rank 0 publishes the checkpoint as iter_N
    with the manifest in its metadata (collective: every rank calls it)."""
    dist.barrier()
    manifests = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_manifest(tmp, dist.get_rank()), manifests, dst=0)
    # Fault-injection hook for the kill-during-save tests ("ITERATION:SECONDS"): the shards of that
    # iteration are written but not yet published when the process sleeps.
    hook = os.environ.get("MEGATRON_DATAEFF_TEST_SAVE_PAUSE", "")
    if hook and int(hook.split(":")[0]) == iteration:
        time.sleep(float(hook.split(":")[1]))
    error = None
    if dist.get_rank() == 0:
        meta = json.loads(metadata)
        meta[FILES] = {name: record for m in manifests for name, record in sorted(m.items())}
        try:
            final = publish_checkpoint(save_dir, tmp, iteration, json.dumps(meta, indent=2))
        except OSError as exc:
            error = exc
        else:
            if keep_last:
                prune(save_dir, keep_last)
            print_fn(f" saved checkpoint {final} ({time.time() - start:.2f} s)")
    _agreed(error, save_dir, tmp)


def _problems(ckpt: str) -> list[str]:
    """What is wrong with one of our checkpoints, checked by every rank on its share of the files (collective):
    its metadata unreadable, or a file missing, truncated or altered against the manifest.  A checkpoint written
    before manifests were recorded is checked by what exists (`check_checkpoint_files` at load)."""
    if is_megatron_lm_checkpoint(ckpt):  # Megatron-LM's own: no manifest; its load checks what it needs
        return []
    try:
        meta = read_metadata(ckpt)
    except (CheckpointError, ValueError) as exc:  # a missing or cut megatron_dataeff.json
        problems = [str(exc)]
    else:
        manifest = meta.get(FILES) or {}
        names = sorted(manifest)[dist.get_rank()::dist.get_world_size()]
        problems = file_problems(ckpt, manifest, names)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    return sorted({p for rank_problems in gathered for p in rank_problems})


def intact_checkpoint(load_dir: str, fallback: bool = True, print_fn=print) -> str:
    """The checkpoint a `--load DIR` resumes (collective): the one `latest` names when it is intact; when it is
    damaged, the newest intact one before it, saying why (`latest` is left as it is: the next save moves it on),
    or, with `fallback` False, a CheckpointError naming the damage."""
    iterations = checkpoint_iterations(load_dir)
    newest = latest_iteration(load_dir)
    candidates = [newest] + [it for it in reversed(iterations) if it < newest]
    damaged = []
    for i, iteration in enumerate(candidates):
        ckpt = os.path.join(load_dir, checkpoint_name(iteration))
        problems = _problems(ckpt) if os.path.isdir(ckpt) else [f"{ckpt} is missing"]
        if not problems:
            if i:
                print_fn(f" resuming from {ckpt} instead, the newest intact checkpoint; {LATEST} still names "
                         f"iteration {newest} until the next save")
            return ckpt
        damaged.append(f"{ckpt} is damaged: " + "; ".join(problems))
        if not fallback:
            raise CheckpointError(damaged[-1] + " (--no-checkpoint-fallback: not falling back to an earlier "
                                                "checkpoint)")
        print_fn(f" warning: {damaged[-1]}")
    raise CheckpointError(f"--load {load_dir}: no intact checkpoint:\n  " + "\n  ".join(damaged))


def checkpoint_to_load(path: str, fallback: bool = True, print_fn=print) -> str:
    """The checkpoint `--load PATH` reads, verified against its manifest (collective): in a `--save` directory whose
    `latest` names an iteration, the newest intact checkpoint (`intact_checkpoint`); otherwise the one checkpoint
    PATH is or names (an iter_N directory, Megatron-LM's `release`), refused when damaged with a CheckpointError
    naming what is wrong."""
    if (latest_marker(path) or "").isdigit():
        return intact_checkpoint(path, fallback, print_fn)
    ckpt = resolve_checkpoint(path)
    problems = _problems(ckpt)
    if problems:
        raise CheckpointError(f"{ckpt} is damaged: " + "; ".join(problems) + " (a checkpoint named by --load is "
                              "not replaced by another; --load its --save directory to resume from the newest "
                              "intact one)")
    return ckpt


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
