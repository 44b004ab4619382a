"""One run, one directory: the run directory follows what the user named (--run-dir, else --log-dir, else --save,
else a new runs/<date>-<time>), and a run never writes into another run's directory unless it continues it."""

import json
import subprocess
import sys

from megatron_dataeff.arguments import build_parser, config_from_args
from tests.conftest import ROOT, child_env

TINY = ["--train-iters", "2", "--num-layers", "1", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--eval-iters", "0", "--log-interval", "1", "--device", "cpu",
        "--tensorboard-dir", ""]


def _placed(*argv) -> str:
    cfg = config_from_args(build_parser().parse_args(list(argv)))
    cfg.validate_layout(1)
    return cfg.logging.run_dir


def test_the_run_directory_follows_what_the_user_named(tmp_path, monkeypatch):
    """--run-dir wins; else --log-dir; else --save (Megatron-LM scripts name only these); else a new directory per
    run under runs/; metrics.jsonl and TensorBoard follow the run directory unless named themselves."""
    monkeypatch.chdir(tmp_path)
    assert _placed("--run-dir", "r", "--log-dir", "l", "--save", "s") == "r"
    assert _placed("--log-dir", "l", "--save", "s") == "l"
    assert _placed("--save", "s") == "s"
    fresh = _placed()
    assert fresh.startswith("runs/") and fresh != "runs/default"
    cfg = config_from_args(build_parser().parse_args(["--save", "s"]))
    cfg.validate_layout(1)
    assert (cfg.logging.log_dir, cfg.logging.tensorboard_dir) == ("s", "s/tensorboard")


def _train(cwd, *argv):
    return subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), *TINY, *argv], cwd=cwd,
                          env=child_env(), capture_output=True, text=True, timeout=600)


def test_two_runs_keep_to_their_places_and_a_used_directory_is_refused(tmp_path):
    """Two runs in one working directory, one with --save, one with --log-dir, write nothing into each other's
    places (and nothing into a shared runs/default); a third run into the first's directory is refused naming
    both runs before anything is written, unless it continues that run (--load of its --save)."""
    a = _train(tmp_path, "--save", "a_ckpt")
    b = _train(tmp_path, "--log-dir", "b_logs")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    assert json.loads((tmp_path / "a_ckpt" / "run.json").read_text())["config"]["checkpoint"]["save"] == "a_ckpt"
    assert (tmp_path / "b_logs" / "run.json").exists() and (tmp_path / "b_logs" / "metrics.jsonl").exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "b_logs" / "iter_0000002").exists()
    before = (tmp_path / "a_ckpt" / "metrics.jsonl").read_text()
    other = _train(tmp_path, "--run-dir", "a_ckpt", "--save", "c_ckpt")
    assert other.returncode == 2 and "holds another run's record" in other.stderr and "--save a_ckpt" in other.stderr
    assert (tmp_path / "a_ckpt" / "metrics.jsonl").read_text() == before and not (tmp_path / "c_ckpt").exists()
    resumed = _train(tmp_path, "--save", "a_ckpt", "--load", "a_ckpt", "--train-iters", "3",
                     "--override-opt-param-scheduler")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "a_ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["split"] == "train"][-1] == 3
