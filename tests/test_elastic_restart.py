"""Elastic restarts: a worker SIGKILLed mid-run under `torchrun --max-restarts 1` makes the agent restart the group,
which resumes from the newest checkpoint (--save X --load X) to the uninterrupted run's losses, and the job exits 0."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, child_env, free_port, losses, run_pretrain, train_iterations, worker_pid
from tests.test_preemption import BASE

pytestmark = pytest.mark.distributed


def test_sigkilled_worker_restarts_from_the_newest_checkpoint(tmp_path):
    """SIGKILL to rank 1 after the checkpoint at iteration 4 (the survivor runs --exit-signal-handler, so the agent's
    SIGTERM meets our handler): the restarted group loads the newest checkpoint k and its losses after k equal the
    uninterrupted run's bit for bit; exit 0."""
    iters, interval = 12, 4
    flags = BASE + ["--train-iters", str(iters), "--lr-decay-iters", str(iters), "--tensorboard-dir", ""]
    full = losses(run_pretrain(flags, tmp_path / "full", nproc=2))

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           f"--master_port={free_port()}", str(ROOT / "pretrain_diffusion.py"), *flags, "--save", str(ckpt),
           "--load", str(ckpt), "--save-interval", str(interval), "--exit-signal-handler", "--run-dir", str(run_dir),
           "--device", "cpu"]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: see the finally below
    with open(log, "w") as out_file:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    latest = ckpt / "latest_checkpointed_iteration.txt"
    pid = None
    try:
        deadline = time.time() + 300
        while train_iterations(run_dir) < 1:  # the workers are up: find rank 1 before the checkpoint
            assert proc.poll() is None, f"training ended early:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, "timed out waiting for iteration 1"
            time.sleep(0.02)
        pid = worker_pid(run_dir, rank=1)
        assert pid is not None, "rank 1's process not found"
        while not latest.exists():
            assert proc.poll() is None, f"training ended before the checkpoint:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, f"timed out waiting for the checkpoint at iteration {interval}"
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        killed_at = train_iterations(run_dir)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if pid is not None:  # megatron-core's checkpoint writer starts a multiprocessing Manager in the worker's
            try:  # session; a SIGKILLed worker leaves it running (holding the job's stdout): end it
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    assert killed_at < iters, f"the run had finished before the kill:\n{out[-3000:]}"
    (resumed_from,) = [int(line.split("(iteration ")[1].split(",")[0]) for line in out.splitlines()
                       if " loaded checkpoint " in line]
    assert resumed_from in range(interval, iters, interval), out[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    restart = len(train) - (iters - resumed_from)  # the first generation's records, then the restarted one's
    assert [r["iteration"] for r in train] == list(range(1, restart + 1)) + list(range(resumed_from + 1, iters + 1))
    assert losses(train[restart:]) == full[resumed_from:]
    assert losses(train[:restart]) == full[:restart]  # the first generation too, up to the kill
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
