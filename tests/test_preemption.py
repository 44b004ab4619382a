"""Exits that save: a real SIGTERM to one rank of a 2-process run, --exit-interval, --exit-duration-in-mins;
each resumes to the uninterrupted run's losses bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, free_port, losses, run_pretrain

BASE = ["--log-interval", "1", "--eval-iters", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--num-layers", "2", "--mlp-dropout", "0.2", "--hidden-dropout", "0.1"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` training into run_dir (read from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"pretrain_diffusion.py" in b" ".join(cmdline) and b"torch.distributed.run" not in b" ".join(cmdline):
            return int(entry)
    return None


def _train_iterations(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}") and '"train"' in line)


def test_sigterm_to_one_rank_saves_and_resumes_bit_identically(tmp_path):
    """SIGTERM to rank 1 only (the rank that logs nothing) mid-run: both ranks stop at the same step boundary,
    the checkpoint is written, the job exits 0; resuming gives the uninterrupted run's losses exactly."""
    iters = 80
    flags = BASE + ["--train-iters", str(iters), "--lr-decay-iters", str(iters)]
    full = losses(run_pretrain(flags, tmp_path / "full", nproc=2))

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "pretrain_diffusion.py"), *flags, "--save", str(ckpt), "--exit-signal-handler",
           "--run-dir", str(run_dir), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while _train_iterations(run_dir) < 3:
            assert proc.poll() is None, f"training ended before the signal:\n{proc.stdout.read()[-4000:]}"
            assert time.time() < deadline, "timed out waiting for iteration 3"
            time.sleep(0.02)
        pid = _worker_pid(run_dir, rank=1)
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


def test_exit_interval_and_duration_save_and_exit_zero(tmp_path):
    """--exit-interval 2 stops after iteration 2 with a checkpoint (resume: the rest of the run, exactly);
    --exit-duration-in-mins spent during start-up stops after the first step."""
    flags = BASE + ["--train-iters", "5", "--lr-decay-iters", "5"]
    full = losses(run_pretrain(flags, tmp_path / "full"))
    ckpt = tmp_path / "ckpt"
    first = losses(run_pretrain(flags + ["--save", str(ckpt), "--exit-interval", "2"], tmp_path / "first"))
    assert first == full[:2]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    rest = losses(run_pretrain(flags + ["--load", str(ckpt)], tmp_path / "rest"))
    assert rest == full[2:]

    ckpt2 = tmp_path / "ckpt2"
    timed = losses(run_pretrain(flags + ["--save", str(ckpt2), "--exit-duration-in-mins", "0.0001"],
                                tmp_path / "timed"))
    assert timed == full[:1]
    assert (ckpt2 / "latest_checkpointed_iteration.txt").read_text() == "1"
