"""Exits that save: a real SIGTERM to one rank of a 2-process run, --exit-interval, --exit-duration-in-mins;
each resumes to the uninterrupted run's losses bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, child_env, free_port, losses, run_pretrain, train_iterations, worker_pid

BASE = ["--log-interval", "1", "--eval-iters", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--num-layers", "2", "--mlp-dropout", "0.2", "--hidden-dropout", "0.1"]


def test_sigterm_to_one_rank_saves_and_resumes_bit_identically(tmp_path):
    """SIGTERM to rank 1 only (the rank that logs nothing) mid-run: both ranks stop at the same step boundary,
    the checkpoint is written, the job exits 0; resuming gives the uninterrupted run's losses exactly."""
    iters = 50
    flags = BASE + ["--train-iters", str(iters), "--lr-decay-iters", str(iters)]
    full = losses(run_pretrain(flags, tmp_path / "full", nproc=2))

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "pretrain_diffusion.py"), *flags, "--save", str(ckpt), "--exit-signal-handler",
           "--run-dir", str(run_dir), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while train_iterations(run_dir) < 3:
            assert proc.poll() is None, f"training ended before the signal:\n{proc.stdout.read()[-4000:]}"
            assert time.time() < deadline, "timed out waiting for iteration 3"
            time.sleep(0.02)
        pid = worker_pid(run_dir, rank=1)
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < iters, out[-2000:]
    assert f"exiting after iteration {stopped}/{iters}: received SIGTERM" in out
    interrupted = losses([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    assert interrupted == full[:stopped]
    resumed = losses(run_pretrain(flags + ["--load", str(ckpt)], tmp_path / "resumed", nproc=2))
    assert resumed == full[stopped:]


def test_exit_interval_saves_and_exits_zero(tmp_path):
    """--exit-interval 2: iterations 1-2, a checkpoint at 2, status.json says it exited (resumable)."""
    ckpt = tmp_path / "ckpt"
    recs = run_pretrain(BASE + ["--train-iters", "5", "--save", str(ckpt), "--exit-interval", "2"], tmp_path / "run")
    assert [r["iteration"] for r in recs if r["split"] == "train"] == [1, 2]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "exited" and status["reason"] == "--exit-interval 2 reached"


def test_exit_conditions_agree_and_report_why():
    """The decision itself: a duration spent, a recorded signal (whichever rank saw it: MAX), an interval."""
    import torch

    from megatron_dataeff.training.exits import ExitConditions

    seen_by_other_rank = lambda t: torch.maximum(t, torch.tensor([signal.SIGUSR1, 0]))  # noqa: E731
    quiet = lambda t: t  # noqa: E731
    assert ExitConditions(False, ["SIGTERM"], 1.0, None, time.time(), quiet).check(5) is None
    assert ExitConditions(False, ["SIGTERM"], 1.0, None, time.time() - 61, quiet).check(5) == \
        "--exit-duration-in-mins 1 reached"
    assert ExitConditions(True, ["SIGTERM", "SIGUSR1"], None, None, time.time(), seen_by_other_rank).check(5) == \
        "received SIGUSR1"
    assert ExitConditions(False, ["SIGTERM"], None, 3, time.time(), quiet).check(6) == "--exit-interval 3 reached"
    assert ExitConditions(False, ["SIGTERM"], None, 3, time.time(), quiet).check(7) is None
    handler = ExitConditions(True, ["SIGUSR1"], None, None, time.time(), quiet)
    handler.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal to this process: recorded, not fatal
        assert handler.check(1) == "received SIGUSR1"
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
