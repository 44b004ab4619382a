"""The checkpoint format: names, discovery, metadata and publication.

Layout of `--save DIR`:

    DIR/iter_0000100/            one checkpoint: dist_checkpointing shards + megatron_dataeff.json
    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint's iteration

A checkpoint is written under a temporary name (`iter_0000100.tmp`), published by a rename once every rank
has finished, and only then is the `latest` marker replaced (write + rename): a process killed during a save
leaves the previous checkpoint as `latest`.  `megatron_dataeff.json` holds what the writer hands in (for
training: the run's facts, the position in the run and the schedule) as plain JSON.  Megatron-LM's own
torch_dist checkpoints (`release/` or iter_N, its `args` in the common state instead of our JSON) are
recognised here and read by `checkpoint/megatron_lm.py`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import zlib

import megatron.core
import torch
from megatron.core import dist_checkpointing
from packaging.version import Version

import megatron_dataeff
from megatron_dataeff.atomic import publish_directory, write_text_atomic
from megatron_dataeff.config import weight_shape_fields
from megatron_dataeff.errors import UserError

LATEST = "latest_checkpointed_iteration.txt"
METADATA = "megatron_dataeff.json"
FILES = "files"  # the metadata's manifest: {file name: {"size": bytes, "crc32": hex}} of every other file
_CHUNK = 8 * 2**20
RELEASE = "release"  # Megatron-LM's marker value and directory of a checkpoint without an iteration


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path and what is wrong."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a failing file system); the previous one stays `latest`."""


def checkpoint_name(iteration: int) -> str:
    """Directory name of the checkpoint of an iteration."""
    return f"iter_{iteration:07d}"


def checkpoint_iterations(save_dir: str) -> list[int]:
    """The iterations of the published checkpoints (iter_N directories) under a `--save` directory, ascending."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(int(d[5:]) for d in os.listdir(save_dir)
                  if d.startswith("iter_") and d[5:].isdigit() and os.path.isdir(os.path.join(save_dir, d)))


def holds_checkpoints(save_dir: str) -> bool:
    """A `--save` directory with a `latest` marker or any iter_N checkpoint in it."""
    return os.path.exists(os.path.join(save_dir, LATEST)) or bool(checkpoint_iterations(save_dir))


def latest_marker(save_dir: str) -> str | None:
    """What DIR's `latest` marker says (an iteration number, or Megatron-LM's `release`); None without one."""
    marker = os.path.join(save_dir, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return f.read().strip()


def latest_iteration(load_dir: str) -> int:
    """The iteration named by DIR's `latest` marker."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    text = latest_marker(load_dir)
    if text is None:
        raise CheckpointError(f"--load {load_dir}: no {LATEST} (no complete checkpoint was saved there)")
    if not text.isdigit():
        raise CheckpointError(f"{os.path.join(load_dir, LATEST)}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint(path: str, iteration: int | None = None) -> str:
    """A checkpoint directory from a `--save` directory (latest or given iteration; Megatron-LM's `release`
    marker too) or itself."""
    if os.path.exists(os.path.join(path, METADATA)) or is_megatron_lm_checkpoint(path):
        return path
    if iteration is None and latest_marker(path) == RELEASE:
        if not os.path.isdir(os.path.join(path, RELEASE)):
            raise CheckpointError(f"{os.path.join(path, LATEST)} says {RELEASE}, but {os.path.join(path, RELEASE)} "
                                  f"is missing")
        return os.path.join(path, RELEASE)
    if iteration is None:
        iteration = latest_iteration(path)
    ckpt = os.path.join(path, checkpoint_name(iteration))
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{path}: no checkpoint for iteration {iteration} ({ckpt} is missing)")
    return ckpt


def read_metadata(ckpt_dir: str) -> dict:
    """Our JSON metadata of one checkpoint directory."""
    path = os.path.join(ckpt_dir, METADATA)
    if not os.path.exists(path) and is_megatron_lm_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is a Megatron-LM checkpoint: pretrain_diffusion.py --load reads its "
                              f"weights (and starts at iteration 0); save that run to evaluate or export it")
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt_dir}: missing {METADATA}; neither a complete megatron_dataeff checkpoint nor "
                              f"a Megatron-LM one (no `args` in its common state)")
    with open(path) as f:
        return json.load(f)


def read_common_state(ckpt: str) -> dict:
    """The common (non-sharded) state of a torch_dist checkpoint (Megatron-LM's `args`, `iteration`, ...), read
    by megatron-core as Megatron-LM reads it (its Namespace and enums are megatron-core's safe globals)."""
    try:  # megatron-core >= 0.19 reads it from the shards (torch DCP) when there is no common.pt
        return dist_checkpointing.load_common_state_dict(ckpt)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"{ckpt}: cannot read its common state: {type(exc).__name__}: {exc}") from exc


def is_megatron_lm_checkpoint(ckpt: str) -> bool:
    """A torch_dist checkpoint directory without our metadata whose common state has Megatron-LM's `args`."""
    if not (os.path.isdir(ckpt) and not os.path.exists(os.path.join(ckpt, METADATA))
            and os.path.exists(os.path.join(ckpt, "metadata.json"))):
        return False
    try:
        return read_common_state(ckpt).get("args") is not None
    except CheckpointError:
        return False


def publish_checkpoint(save_dir: str, tmp: str, iteration: int, metadata: str) -> str:
    """(one process) Add our metadata to the finished checkpoint directory `tmp`, rename it to
    SAVE_DIR/iter_N, then point the `latest` marker at it; returns iter_N's path."""
    final = os.path.join(save_dir, checkpoint_name(iteration))
    write_text_atomic(os.path.join(tmp, METADATA), metadata)
    publish_directory(tmp, final)
    write_text_atomic(os.path.join(save_dir, LATEST), str(iteration))
    return final


def prune(save_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints."""
    for it in checkpoint_iterations(save_dir)[:-keep]:
        shutil.rmtree(os.path.join(save_dir, checkpoint_name(it)), ignore_errors=True)


def megatron_core_version() -> str:
    """The installed megatron-core's release, as pip installed it.  Not `megatron.core.__version__`: from 0.19 that
    appends the short hash of whatever git repository holds the installed package (`git rev-parse` in its
    directory), i.e. ours when the virtual environment sits inside this checkout, as tests/run.sh's does."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on the path
        return megatron.core.__version__.split("+")[0]


def checkpoint_versions() -> dict:
    """The versions recorded with a run and in its checkpoints (`written_by`)."""
    return {"megatron_dataeff": megatron_dataeff.__version__, "megatron_core": megatron_core_version(),
            "torch": torch.__version__}


def check_checkpoint_files(ckpt: str, meta: dict) -> None:
    """The files dist_checkpointing needs, present (before any collective work).

    megatron-core up to 0.18 writes the common state to `common.pt` and needs it to load; 0.19 keeps it
    inside the shards (and reads both), so a 0.19 checkpoint is refused by earlier releases, by name.
    """
    missing = [f for f in ("metadata.json", ".metadata") if not os.path.exists(os.path.join(ckpt, f))]
    shards = [f for f in os.listdir(ckpt) if f.endswith(".distcp")]
    if not shards:
        missing.append("*.distcp shards")
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")
    installed = megatron_core_version()
    if not os.path.exists(os.path.join(ckpt, "common.pt")) and Version(installed).release < (0, 19):
        writer = meta.get("written_by", {}).get("megatron_core", ">= 0.19")
        raise CheckpointError(f"{ckpt} was written by megatron-core {writer} (no common.pt); megatron-core "
                              f"{installed}, installed here, cannot read it: install megatron-core >= 0.19")


def check_compatible(ckpt: str, meta: dict, model: dict, vocab_ids: int) -> None:
    """Refuse a checkpoint whose model shape (`model`: a ModelConfig as a dict) or vocabulary differs from the
    model it is loaded into, naming the fields."""
    saved = meta.get("config", {}).get("model", {})
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {model[k]!r}"
             for k in weight_shape_fields() if k in saved and saved.get(k) != model[k]]
    if meta.get("vocab_ids") != vocab_ids:
        diffs.append(f"vocabulary ids: checkpoint {meta.get('vocab_ids')}, this run {vocab_ids} "
                     f"(--tokenizer-type/--tokenizer-model)")
    if diffs:
        raise CheckpointError(f"{ckpt} does not fit this model:\n  " + "\n  ".join(diffs))


def file_record(path: str) -> dict:
    """{"size", "crc32"} of one file (zlib's CRC-32, read in 8 MiB chunks: a few GB/s, see
    benchmarks/bench_checkpoint.py)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def file_problems(ckpt: str, manifest: dict, names) -> list[str]:
    """What is wrong with the files `names` of a checkpoint against its manifest: missing, truncated or
    altered (each named)."""
    problems = []
    for name in names:
        path, want = os.path.join(ckpt, name), manifest[name]
        if not os.path.exists(path):
            problems.append(f"{name} is missing")
            continue
        size = os.path.getsize(path)
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were written")
        elif file_record(path)["crc32"] != want["crc32"]:
            problems.append(f"{name} does not match its checksum (altered since it was written)")
    return problems
