"""Resume semantics of the schedule: a checkpoint whose schedule differs from the command line is refused with
both values named, unless --override-opt-param-scheduler (extend a run) or --use-checkpoint-opt-param-scheduler."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env, run_pretrain

BASE = ["--log-interval", "1", "--eval-iters", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--num-layers", "2", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2"]


def _lrs(records):
    return {r["iteration"]: r["lr"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 6-step cosine run (decay over its 6 steps) saved at its end."""
    tmp = tmp_path_factory.mktemp("schedule")
    run_pretrain(BASE + ["--train-iters", "6", "--save", str(tmp / "ckpt")], tmp / "six")
    return tmp / "ckpt"


def test_longer_train_iters_is_refused_naming_both_values(six_steps, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), *BASE, "--train-iters", "12",
                           "--min-lr", "2e-4", "--load", str(six_steps), "--run-dir", str(tmp_path / "r"),
                           "--device", "cpu"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--lr-decay-iters (not given: --train-iters): checkpoint 6, this run 12" in proc.stderr
    assert "--min-lr: checkpoint 0.0001, this run 0.0002" in proc.stderr
    assert "--override-opt-param-scheduler" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists() or "train" not in (tmp_path / "r" / "metrics.jsonl").read_text()


def test_override_extends_the_run_on_the_new_schedule(six_steps, tmp_path):
    """Extending 6 -> 12 steps with --override-opt-param-scheduler: steps 7-12 follow the 12-step schedule
    exactly (the lr a 12-step run has there); the data position continues."""
    extended = run_pretrain(BASE + ["--train-iters", "12", "--load", str(six_steps),
                                    "--override-opt-param-scheduler"], tmp_path / "ext")
    reference = run_pretrain(BASE + ["--train-iters", "12"], tmp_path / "ref")
    got, want = _lrs(extended), _lrs(reference)
    assert sorted(got) == list(range(7, 13))
    assert [got[i] for i in range(7, 13)] == [want[i] for i in range(7, 13)]
    assert extended[-1]["consumed_samples"] == 12 * 4


def test_override_with_new_learning_rates_follows_them(six_steps, tmp_path):
    """Extending with another --lr and --min-lr under --override-opt-param-scheduler loads (megatron-core 0.19 finds
    saved parameter groups by their rates) and steps 7-12 run at the new schedule's rates exactly."""
    new = ["--train-iters", "12", "--lr", "2e-3", "--min-lr", "3e-4"]
    extended = run_pretrain(BASE + new + ["--load", str(six_steps), "--override-opt-param-scheduler"], tmp_path / "ext")
    want = _lrs(run_pretrain(BASE + new, tmp_path / "ref"))
    got = _lrs(extended)
    assert [got[i] for i in range(7, 13)] == [want[i] for i in range(7, 13)]


def test_use_checkpoint_schedule_keeps_its_decay(six_steps, tmp_path):
    """--use-checkpoint-opt-param-scheduler: the checkpoint's 6-step cosine has ended, so steps 7-9 run at
    its --min-lr."""
    recs = run_pretrain(BASE + ["--train-iters", "9", "--load", str(six_steps),
                                "--use-checkpoint-opt-param-scheduler"], tmp_path / "keep")
    assert [r["lr"] for r in recs if r["split"] == "train"] == [pytest.approx(1e-4, rel=1e-12)] * 3
