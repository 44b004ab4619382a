"""Checkpoints verified at load (sizes and CRC-32s recorded at save), with fallback to the newest intact one; a save
that finds the disk full leaves the previous checkpoint as it was and stops the run with one line."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, child_env, free_port, losses, train_in_process

FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
         "--lr-decay-iters", "4", "--eval-iters", "0", "--log-interval", "1", "--hidden-dropout", "0.1"]


@pytest.fixture
def saved(megatron_cpu, tmp_path):
    """A run of 4 steps saved at 2 and 4: (its train losses, the --save directory)."""
    ckpt = tmp_path / "ckpt"
    full = losses(train_in_process(FLAGS + ["--save", str(ckpt), "--save-interval", "2"], tmp_path / "full"))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    return full, ckpt


def _damage(ckpt, how: str) -> str:
    """Damage iter_0000004 of `ckpt` as a failing node or file system would; the name the error should give."""
    newest = ckpt / "iter_0000004"
    shard = sorted(p for p in newest.iterdir() if p.suffix == ".distcp")[-1]
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "flipped":
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))
    elif how == "missing_shard":
        shard.unlink()
    elif how == "missing_metadata":
        (newest / "megatron_dataeff.json").unlink()
        return "megatron_dataeff.json"
    return shard.name


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing_shard", "missing_metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(saved, tmp_path, capsys, how):
    """A truncated, altered or missing shard, or missing metadata, in the newest checkpoint: the resume says what
    is wrong, loads iteration 2 instead (saying `latest` still names 4) and continues exactly as the
    uninterrupted run did."""
    full, ckpt = saved
    name = _damage(ckpt, how)
    capsys.readouterr()
    resumed = losses(train_in_process(FLAGS + ["--load", str(ckpt)], tmp_path / "resumed"))
    out = capsys.readouterr().out
    assert "iter_0000004 is damaged" in out and name in out
    assert "resuming from" in out and "iter_0000002" in out and "still names iteration 4" in out
    assert resumed == full[2:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"  # not moved back silently


def test_no_checkpoint_fallback_refuses_naming_the_file(saved, tmp_path):
    """--no-checkpoint-fallback: a damaged newest checkpoint is an error naming the file, nothing is loaded."""
    from megatron_dataeff.checkpoint.format import CheckpointError

    _, ckpt = saved
    name = _damage(ckpt, "truncated")
    with pytest.raises(CheckpointError, match=f"iter_0000004 is damaged: {name} has"):
        train_in_process(FLAGS + ["--load", str(ckpt), "--no-checkpoint-fallback"], tmp_path / "refused")


def test_a_checkpoint_named_by_load_is_verified_too(saved, tmp_path):
    """--load DIR/iter_N (one iteration, named): checked against its manifest as a --save directory is; damaged, it
    is refused in one line naming the file (nothing else is loaded in its place); intact, the run resumes from it
    exactly as the uninterrupted run went on."""
    from megatron_dataeff.checkpoint.format import CheckpointError

    full, ckpt = saved
    name = _damage(ckpt, "flipped")
    with pytest.raises(CheckpointError, match=f"iter_0000004 is damaged: {name} does not match its checksum") as err:
        train_in_process(FLAGS + ["--load", str(ckpt / "iter_0000004")], tmp_path / "named_damaged")
    assert "\n" not in str(err.value)
    resumed = losses(train_in_process(FLAGS + ["--load", str(ckpt / "iter_0000002")], tmp_path / "named_intact"))
    assert resumed == full[2:]


def test_checkpoint_without_a_manifest_still_loads(saved, tmp_path, capsys):
    """A checkpoint written before sizes and checksums were recorded resumes as before, with no warning."""
    full, ckpt = saved
    meta_path = ckpt / "iter_0000004" / "megatron_dataeff.json"
    meta = json.loads(meta_path.read_text())
    assert set(meta["files"]) >= {".metadata", "metadata.json"} and all(
        set(r) == {"size", "crc32"} for r in meta["files"].values())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    train_in_process(FLAGS + ["--train-iters", "6", "--lr-decay-iters", "4", "--load", str(ckpt)], tmp_path / "old")
    out = capsys.readouterr().out
    assert "loaded checkpoint" in out and "iter_0000004" in out and "damaged" not in out


def test_save_refused_when_the_disk_cannot_hold_it(saved, tmp_path, monkeypatch):
    """Less free space than the previous checkpoint's size: the save is refused before writing, naming the path and
    the free space; no partial directory, `latest` and the previous checkpoint untouched and loadable."""
    from megatron_dataeff.checkpoint import state
    from megatron_dataeff.checkpoint.format import CheckpointSaveError

    _, ckpt = saved
    real = shutil.disk_usage
    monkeypatch.setattr(state.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=300 * 1024))
    flags = FLAGS + ["--train-iters", "6", "--save-interval", "2", "--save", str(ckpt), "--load", str(ckpt),
                     "--override-opt-param-scheduler"]
    with pytest.raises(CheckpointSaveError, match=r"--save .*ckpt: cannot write iter_0000006.tmp .*MiB needed.*"
                                                  r"0.3 MiB free there; iteration 4 stays the latest checkpoint"):
        train_in_process(flags, tmp_path / "full_disk")
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "iter_0000004",
                                                       "latest_checkpointed_iteration.txt"]
    status = tmp_path / "full_disk" / "status.json"
    assert not status.exists() or json.loads(status.read_text())["state"] != "finished"
    monkeypatch.undo()
    train_in_process(FLAGS + ["--load", str(ckpt)], tmp_path / "after")  # still loads


def _tmpfs(tmp_path, options: str):
    """A tmpfs mounted with `options` under tmp_path, unmounted after the test; skipped where mounting is not
    permitted."""
    path = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs (root can mount one here and in CI)."""
    yield from _tmpfs(tmp_path, "size=1m")


def test_a_full_file_system_stops_the_run_with_one_line(tiny_filesystem, tmp_path):
    """A real save into a 1 MiB file system runs out of space mid-write: exit 2 with one line naming the path and the
    free space, the partial directory removed, no `latest`, and no status.json saying finished."""
    save = tiny_filesystem / "ckpt"
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), *FLAGS, "--device", "cpu",
                           "--save", str(save), "--run-dir", str(run_dir), "--tensorboard-dir", ""],
                          capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"--save {save}: cannot write iter_0000004.tmp" in line and "MiB free there" in line
    assert "Traceback" not in proc.stderr
    assert os.listdir(save) == []
    status = run_dir / "status.json"
    assert not status.exists() or json.loads(status.read_text())["state"] != "finished"


@pytest.fixture
def inode_filesystem(tmp_path):
    """A tmpfs with an inode limit that a test can lower (remount) once a first checkpoint is in it; skipped where
    mounting is not permitted."""
    yield from _tmpfs(tmp_path, "size=64m,nr_inodes=1000")


@pytest.mark.distributed
def test_a_full_file_system_under_a_background_save_stops_the_run_with_one_line(inode_filesystem, megatron_cpu,
                                                                                 tmp_path):
    """--async-save on 2 processes: iteration 4's background writers run out of space (the file system holds room
    for the directory and rank 0's common file only: a real ENOSPC in the forked writers, none in the foreground),
    and the run stops as a synchronous save does: exit 2 with one line (from rank 0) naming the path and the free space,
    no traceback, the partial directory removed, iteration 2 still `latest` and loadable, no status.json saying finished."""
    save = inode_filesystem / "ckpt"
    flags = FLAGS + ["--train-iters", "6", "--lr-decay-iters", "6", "--save", str(save), "--tensorboard-dir", ""]
    train_in_process(flags + ["--exit-interval", "2"], tmp_path / "first")
    used = int(subprocess.run(["df", "--output=iused", str(inode_filesystem)], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used + 2}", str(inode_filesystem)], check=True)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "pretrain_diffusion.py"), *flags, "--device",
                           "cpu", "--load", str(save), "--save-interval", "2", "--async-save", "--run-dir",
                           str(run_dir)], capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=600)
    assert proc.returncode != 0, proc.stdout[-3000:]  # torchrun's, for a worker's exit 2
    assert "iter_0000004.tmp in the background" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one line: every rank raised the error alike, and rank 0 alone reports it before any rank exits
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    # the writer's errno reaches rank 0 with megatron-core 0.16; later releases keep only its type, and the full
    # file system is seen instead
    expected = (rf"error: --save {re.escape(str(save))}: cannot write iter_0000004.tmp \((No space left on device|no "
                rf"space left \(no free inodes\): .*OSError.*)\); [0-9.,]+ MiB free there; iteration 2 stays the "
                rf"latest checkpoint")
    assert all(re.fullmatch(expected, line) for line in lines), lines
    assert "(exitcode: 2)" in proc.stderr and not re.search(r"\[rank\d\]: Traceback", proc.stderr), proc.stderr[-3000:]
    assert sorted(os.listdir(save)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    status = run_dir / "status.json"
    assert not status.exists() or json.loads(status.read_text())["state"] != "finished"
    after = train_in_process(FLAGS + ["--load", str(save), "--train-iters", "3", "--lr-decay-iters", "6"],
                             tmp_path / "after")  # still loads
    assert [r["iteration"] for r in after if r["split"] == "train"] == [3]
