"""examples/slurm/pretrain.sbatch under stand-in `srun` / `scontrol` (this machine has no SLURM): a launch that
exits early saves and requeues the job; the requeued launch resumes and finishes without requeueing; the same with
MAX_RESTARTS (one torchrun agent per node)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env, free_port

FAKE_SRUN = """#!/usr/bin/env bash
# one task: drop srun's options, run the rest with SLURM's task variables
while [ "$#" -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") echo 127.0.0.1 ;;
    requeue*) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""


def _launch(tmp_path: Path, run_dir: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = child_env(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=str(ROOT),
                    RUN_DIR=str(run_dir), OVERLAP="0", MASTER_PORT=str(free_port()),
                    FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"), **extra_env)
    small = ["--model-preset", "tiny", "--seq-length", "32", "--no-bf16", "--device", "cpu", "--train-iters", "4",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--unique-tokens", "20000", "--lr-warmup-iters",
             "0", "--lr-decay-iters", "4", "--eval-iters", "0", "--log-interval", "1", "--exit-interval", "2"]
    return subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "pretrain.sbatch"), *small, *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("launch", ["srun", pytest.param("torchrun", marks=pytest.mark.distributed)])
def test_early_exit_requeues_and_the_requeued_job_finishes(tmp_path, launch):
    """An --exit-interval stop saves, writes status.json `exited` and requeues; the requeued launch resumes and
    finishes without requeueing: one srun task per rank, or (MAX_RESTARTS=1) one torchrun agent of 2 workers."""
    extra = {"MAX_RESTARTS": "1", "GPUS_PER_NODE": "2"} if launch == "torchrun" else {}
    run_dir = tmp_path / "run"
    first = _launch(tmp_path, run_dir, **extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "exited" and status["iteration"] == 2
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    if launch == "srun":  # a launch that fails is not requeued: the first launch's status.json is not its own
        failed = _launch(tmp_path, run_dir, "--no-such-flag")
        assert failed.returncode != 0 and "not requeued" in failed.stderr, failed.stdout[-3000:] + failed.stderr[-3000:]
        assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    second = _launch(tmp_path, run_dir, **extra)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["iteration"] == 4
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert "loaded checkpoint" in second.stdout
    assert f"| world {2 if launch == 'torchrun' else 1} (" in second.stdout
