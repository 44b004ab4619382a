"""The training step reads the device once: losses, token counts and named parts add up on the device over the
micro-batches and reach the host once a step (issue: one host sync per step)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_dataeff.arguments import build_parser, config_from_args


class _HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: scalar reads (`.item()`, `float(t)`,
    `bool(t)`), and `.cpu()` / `.tolist()` calls (on a CPU these do not dispatch, so they are counted where they
    are called)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads_per_step(tmp_path, micro_batch: int, monkeypatch, objective) -> int:
    from megatron_dataeff.training.loop import Trainer

    argv = ["--num-layers", "2", "--seq-length", "32", "--train-iters", "3", "--global-batch-size", "8",
            "--micro-batch-size", str(micro_batch), "--eval-iters", "0", "--run-dir", str(tmp_path / str(micro_batch)),
            "--device", "cpu", "--tensorboard-dir", "", *objective]
    trainer = Trainer(config_from_args(build_parser().parse_args(argv)))
    try:
        trainer.train_step(0)  # first-step work (lazy initialisations) out of the count
        counter = _HostReads()
        calls = {"n": 0}
        for name in ("cpu", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, **k):
                calls["n"] += 1
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        with counter:
            trainer.train_step(1)
        monkeypatch.undo()
        return counter.count + calls["n"]
    finally:
        trainer.close()


@pytest.mark.parametrize("objective", [["--objective", "ar"], ["--objective", "ar", "--token-dropout-rate", "0.3",
                                                                "--token-dropout-aux-weight", "0.5"]],
                         ids=["ar", "mir-with-named-parts"])
def test_host_reads_do_not_grow_with_micro_batches(megatron_cpu, tmp_path, monkeypatch, objective):
    """A training step with 4 micro-batches reads the device as often as one with a single micro-batch (AR, and
    MIR whose named loss parts add up beside the loss)."""
    one = _reads_per_step(tmp_path, 8, monkeypatch, objective)
    four = _reads_per_step(tmp_path, 2, monkeypatch, objective)
    assert four == one, (one, four)
