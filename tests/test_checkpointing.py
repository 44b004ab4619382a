"""Checkpoints: exact resume (dropout included), kill during save, refusal of bad checkpoints, TP=2 -> TP=1."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, losses, run_pretrain

BASE = ["--train-iters", "6", "--log-interval", "1", "--eval-iters", "0", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--seq-length", "32", "--num-layers", "2", "--lr-decay-iters", "6"]
DROPOUT = ["--mlp-dropout", "0.2", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _saved_run(tmp_path, extra=(), iters=3, nproc=1):
    ckpt = tmp_path / "ckpt"
    run_pretrain(BASE + list(extra) + ["--train-iters", str(iters), "--save", str(ckpt)], tmp_path / "first",
                 nproc=nproc)
    return ckpt


@pytest.mark.parametrize("objective, extra", [
    ("ar", ["--use-distributed-optimizer"]), ("mdm", ["--bf16"]),
    ("dual", ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]),
    ("block", ["--block-size", "8"]),
], ids=["ar-distributed-optimizer", "mdm-bf16", "dual-packed-documents", "block-diffusion"])
def test_exact_resume_with_dropout(tmp_path, objective, extra):
    """2N steps == N steps, saved, resumed for N more: bit-identical losses, dropout RNG included; with the
    distributed optimizer; in bf16 too (bf16 weights, norms included, with fp32 master weights in the optimizer
    state); with Megatron-LM's packed-document flags."""
    flags = BASE + DROPOUT + ["--objective", objective] + extra
    full = losses(run_pretrain(flags, tmp_path / "full"))
    ckpt = _saved_run(tmp_path, DROPOUT + ["--objective", objective] + extra)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    resumed = losses(run_pretrain(flags + ["--load", str(ckpt)], tmp_path / "second"))
    assert resumed == full[3:]


def test_async_save_resumes_exactly(tmp_path):
    """--async-save on 2 processes: background saves at 2 and 4, an --exit-interval stop at 4 that waits for
    its publication, then a resume whose losses equal an uninterrupted run's bit for bit."""
    flags = BASE + DROPOUT
    full = losses(run_pretrain(flags, tmp_path / "full", nproc=2))
    ckpt = tmp_path / "ckpt"
    save = ["--save", str(ckpt), "--save-interval", "2", "--async-save"]
    first = run_pretrain(flags + save + ["--exit-interval", "4"], tmp_path / "first", nproc=2)
    assert [r["iteration"] for r in first if r["split"] == "train"] == [1, 2, 3, 4]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "iter_0000004",
                                                       "latest_checkpointed_iteration.txt"]
    resumed = losses(run_pretrain(flags + save + ["--load", str(ckpt)], tmp_path / "second", nproc=2))
    assert resumed == full[4:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"


# the sync case is slow-only: the async case goes through the same publication (_publish) after its writer
@pytest.mark.parametrize("mode", [pytest.param("sync", marks=pytest.mark.slow), "async"])
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, mode):
    """SIGKILL while iteration 4's shards are written but unpublished (with --async-save: written by the
    background writer, publication pending): --load picks iteration 2."""
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), MEGATRON_DATAEFF_TEST_SAVE_PAUSE="4:120", OMP_NUM_THREADS="1")
    extra = ["--async-save"] if mode == "async" else []
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_diffusion.py"), *BASE, *extra, "--save", str(ckpt),
                             "--save-interval", "2", "--run-dir", str(tmp_path / "killed"), "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tmp_ckpt = ckpt / "iter_0000004.tmp"
    deadline = time.time() + 240
    while not (tmp_ckpt / ".metadata").exists():
        assert proc.poll() is None, "training exited before the save of iteration 4"
        assert time.time() < deadline, "timed out waiting for the save of iteration 4"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (ckpt / "iter_0000004").exists()
    recs = run_pretrain(BASE + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval", "2"],
                        tmp_path / "resumed")
    assert [r["iteration"] for r in recs if r["split"] == "train"] == [3, 4, 5, 6]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert not tmp_ckpt.exists()


def _run_expect_error(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), *args, "--run-dir",
                           str(tmp_path / "err"), "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    return proc.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    return _saved_run(tmp)


def test_missing_shard_and_metadata_are_refused(saved, tmp_path):
    """A checkpoint missing a shard or its metadata is refused, naming what is missing (the checks --load runs
    before any collective work, called here in-process)."""
    import shutil

    from megatron_dataeff.checkpoint.format import CheckpointError, check_checkpoint_files, read_metadata, resolve_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    it = broken / "iter_0000003"
    for shard in it.glob("*.distcp"):
        shard.unlink()
    ckpt = resolve_checkpoint(str(broken))
    with pytest.raises(CheckpointError, match="incomplete checkpoint.*distcp"):
        check_checkpoint_files(ckpt, read_metadata(ckpt))
    (it / "megatron_dataeff.json").unlink()
    with pytest.raises(CheckpointError, match="missing megatron_dataeff.json"):
        read_metadata(resolve_checkpoint(str(broken), 3))


def test_truncated_shard_is_refused(megatron_cpu, saved, tmp_path):
    """A truncated shard fails the load with the checkpoint named, never a silent fresh start."""
    import shutil

    from megatron_dataeff.inference.loading import load_model_for_inference
    from megatron_dataeff.checkpoint.format import CheckpointError

    broken = tmp_path / "trunc"
    shutil.copytree(saved, broken)
    shard = sorted((broken / "iter_0000003").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="iter_0000003: cannot load"):
        load_model_for_inference(str(broken))


def test_other_shape_is_refused_naming_the_flag(saved, tmp_path):
    """Loading into a model of another shape names the differing flag."""
    err = _run_expect_error(BASE + ["--load", str(saved), "--ffn-hidden-size", "256"], tmp_path)
    assert "--ffn-hidden-size: checkpoint 384, this run 256" in err


def test_load_without_checkpoint_is_an_error(tmp_path):
    """--load of a directory with no checkpoint stops (unless it is also --save: auto-resume)."""
    from megatron_dataeff.checkpoint.format import CheckpointError, latest_iteration

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        latest_iteration(str(tmp_path / "empty"))
    recs = run_pretrain(BASE + ["--train-iters", "2", "--load", str(tmp_path / "auto"), "--save",
                                str(tmp_path / "auto")], tmp_path / "autorun")
    assert len(losses(recs)) == 2


@pytest.mark.distributed
def test_pp2_checkpoint_resumes_at_pp1(tmp_path):
    """Saved at PP=2 (each stage its own layers), resumed at PP=1: the PP=2 run's own continuation."""
    pp2 = ["--pipeline-model-parallel-size", "2"]
    full = losses(run_pretrain(BASE + pp2, tmp_path / "full", nproc=2))
    ckpt = _saved_run(tmp_path, pp2, nproc=2)
    resumed = losses(run_pretrain(BASE + ["--load", str(ckpt)], tmp_path / "second"))
    assert len(resumed) == 3
    for a, b in zip(resumed, full[3:]):
        assert abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.distributed
def test_tp2_checkpoint_resumes_at_tp1(tmp_path):
    """Saved at TP=2 (distributed optimizer state in model space), resumed at TP=1: same losses."""
    full = losses(run_pretrain(BASE, tmp_path / "full"))
    ckpt = _saved_run(tmp_path, ["--tensor-model-parallel-size", "2"], nproc=2)
    resumed = losses(run_pretrain(BASE + ["--load", str(ckpt)], tmp_path / "second"))
    assert len(resumed) == 3
    for a, b in zip(resumed, full[3:]):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    """--keep-last K keeps the newest K checkpoints (the final one included)."""
    ckpt = tmp_path / "ckpt"
    run_pretrain(BASE + ["--save", str(ckpt), "--save-interval", "1", "--keep-last", "2"], tmp_path / "run")
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000005", "iter_0000006"]


def test_checkpoint_without_common_pt_is_refused_by_older_megatron(saved, tmp_path):
    """A checkpoint with no common.pt (megatron-core >= 0.19 writes none) is refused up front by releases
    before 0.19, naming the writer's and the installed version; the metadata records the writer."""
    import json
    import shutil

    from packaging.version import Version

    import megatron_dataeff
    from megatron_dataeff.checkpoint.format import megatron_core_version

    meta = json.loads((saved / "iter_0000003" / "megatron_dataeff.json").read_text())
    assert meta["written_by"]["megatron_core"] == megatron_core_version()
    assert meta["written_by"]["megatron_dataeff"] == megatron_dataeff.__version__
    run = json.loads((saved.parent / "first" / "run.json").read_text())
    assert {k: run[k] for k in ("config", "tokenizer", "vocab_ids", "layout", "written_by")} == \
        {k: meta[k] for k in ("config", "tokenizer", "vocab_ids", "layout", "written_by")}
    if Version(megatron_core_version()).release >= (0, 19):
        pytest.skip("megatron-core >= 0.19 reads checkpoints with and without common.pt")
    broken = tmp_path / "from019"
    shutil.copytree(saved, broken)
    (broken / "iter_0000003" / "common.pt").unlink()
    meta["written_by"]["megatron_core"] = "0.19.2"
    meta["files"].pop("common.pt")  # as 0.19 records its files: without one
    (broken / "iter_0000003" / "megatron_dataeff.json").write_text(json.dumps(meta))
    err = _run_expect_error(BASE + ["--load", str(broken)], tmp_path)
    assert "written by megatron-core 0.19.2 (no common.pt)" in err
    assert f"megatron-core {megatron_core_version()}, installed here, cannot read it" in err
