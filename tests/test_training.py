"""Single-process training: metrics, NaN handling, resume from a checkpoint, quickstart-sized run."""

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
from tests.conftest import ROOT, losses, run_pretrain

SMALL = ["--train-iters", "6", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--num-layers", "2"]


def test_metrics_jsonl_and_tensorboard(tmp_path):
    """Every logged value lands in metrics.jsonl (with the required keys) and in TensorBoard."""
    recs = run_pretrain(SMALL + ["--objective", "mdm"], tmp_path)
    train = [r for r in recs if r["split"] == "train"]
    valid = [r for r in recs if r["split"] == "valid"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in valid] == [3, 6]
    for r in train:
        for key in ("iteration", "split", "loss", "tokens_per_s", "lr", "grad_norm", "epoch", "ms_per_step",
                    "consumed_tokens"):
            assert key in r
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert train[-1]["consumed_tokens"] == 6 * 4 * 32
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["mask_token_id"] == 257 and run["config"]["objective"]["name"] == "mdm"
    # tools/plot_runs.py on the run directory: the table, and the run's own train + validation loss curves
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_runs.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "report" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "finished" and status["iteration"] == 6


def test_epochs_set_the_iterations(tmp_path):
    """--epochs E over --unique-tokens N runs ceil(E * samples / global batch) iterations."""
    recs = run_pretrain(["--unique-tokens", "3300", "--epochs", "2", "--seq-length", "32", "--micro-batch-size",
                         "4", "--global-batch-size", "8", "--num-layers", "1", "--log-interval", "1",
                         "--eval-iters", "0"], tmp_path)
    train = [r for r in recs if r["split"] == "train"]
    samples = (3300 - 1) // 32
    assert len(train) == math.ceil(2 * samples / 8)
    assert train[-1]["epoch"] == pytest.approx(len(train) * 8 / samples)


def test_nonfinite_loss_stops_naming_the_step(megatron_cpu, tmp_path, monkeypatch):
    """A NaN loss stops the run with the iteration in the message; --skip-nonfinite-steps skips it."""
    from megatron_dataeff.training.loop import NonFiniteLossError, Trainer

    def poisoned(self, per_token_loss, batch):
        return (per_token_loss * float("nan")).sum(), batch.num_tokens

    for skip in (False, True):
        argv = SMALL + ["--run-dir", str(tmp_path / str(skip)), "--device", "cpu", "--tensorboard-dir", ""]
        if skip:
            argv.append("--skip-nonfinite-steps")
        cfg = config_from_args(build_parser().parse_args(argv))
        trainer = Trainer(cfg)
        trainer.train_step(0)
        monkeypatch.setattr(type(trainer.objective), "loss", poisoned)
        before = [p.detach().clone() for p in trainer.model[0].parameters()]
        if skip:
            loss, _, stepped = trainer.train_step(1)
            assert math.isnan(loss) and not stepped
            after = list(trainer.model[0].parameters())
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        else:
            with pytest.raises(NonFiniteLossError, match="at iteration 2"):
                trainer.train_step(1)
        monkeypatch.undo()
        trainer.close()


@pytest.mark.parametrize("raised", [ValueError("a bug deep inside"), KeyError("missing")])
def test_a_bug_keeps_its_traceback_and_bad_input_is_one_line(monkeypatch, capsys, raised):
    """pretrain_diffusion.main: the project's user-facing errors (UserError: ConfigError, CheckpointError,
    DataError, ...) become one `error:` line and exit 2; any other exception, a ValueError included,
    propagates with its traceback."""
    import importlib.util

    from megatron_dataeff.errors import DataError
    from megatron_dataeff import distributed
    from megatron_dataeff.training import loop

    spec = importlib.util.spec_from_file_location("pretrain_main", ROOT / "pretrain_diffusion.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)

    class Failing:
        def __init__(self, cfg):
            raise self.error

        error = raised

    monkeypatch.setattr(loop, "Trainer", Failing)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)  # keep the session's process group for later tests
    with pytest.raises(type(raised)):
        entry.main(["--train-iters", "1", "--device", "cpu"])
    Failing.error = DataError("--unique-tokens 9 exceeds the 3 tokens of the training split")
    assert entry.main(["--train-iters", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: --unique-tokens 9 exceeds the 3 tokens of the training split"
