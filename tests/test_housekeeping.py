"""Megatron-LM's memory housekeeping flags do what Megatron-LM's do: --manual-gc turns the automatic collector
off and collects at the start, every --manual-gc-interval steps and around validation; --empty-unused-memory-level
empties the CUDA cache after forward-backward (1) and after the optimizer step (2); --decoupled-lr gives the
embedding and output layer their own lr; --logging-level sets the root logger's level."""

import gc
import logging

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.config import ComputeConfig
from megatron_dataeff.training import housekeeping
from megatron_dataeff.training.housekeeping import Housekeeping

SMALL = ["--train-iters", "4", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--num-layers", "2",
         "--device", "cpu", "--tensorboard-dir", ""]


class _Calls:
    def __init__(self):
        self.calls = []

    def collect(self, generation=2):
        self.calls.append(("gc", generation))

    def empty_cache(self):
        self.calls.append(("empty",))


@pytest.fixture
def calls(monkeypatch):
    c = _Calls()
    monkeypatch.setattr(housekeeping.gc, "collect", c.collect)
    monkeypatch.setattr(housekeeping.torch.cuda, "empty_cache", c.empty_cache)
    return c


@pytest.mark.parametrize("level", [0, 1, 2])
def test_empty_unused_memory_level(level, calls):
    h = Housekeeping(ComputeConfig(empty_unused_memory_level=level), "cuda")
    h.after_forward_backward()
    assert calls.calls == ([("empty",)] if level >= 1 else [])
    h.after_optimizer_step()
    assert calls.calls.count(("empty",)) == {0: 0, 1: 1, 2: 2}[level]
    calls.calls.clear()
    h.after_validation()
    assert calls.calls == ([("empty",)] if level >= 1 else [])
    calls.calls.clear()
    cpu = Housekeeping(ComputeConfig(empty_unused_memory_level=2), "cpu")
    cpu.after_forward_backward(), cpu.after_optimizer_step(), cpu.after_validation()
    assert calls.calls == []


def test_manual_gc_collects_at_megatron_lm_points(calls):
    assert gc.isenabled()
    h = Housekeeping(ComputeConfig(manual_gc=True, manual_gc_interval=3), "cpu")
    h.start()
    try:
        assert not gc.isenabled() and calls.calls == [("gc", 2)]
        for it in range(1, 7):
            h.after_step(it)
        assert calls.calls == [("gc", 2)] * 3  # steps 3 and 6
        h.before_validation(), h.after_validation()
        assert calls.calls[-2:] == [("gc", 2), ("gc", 0)]
    finally:
        h.stop()
    assert gc.isenabled()
    calls.calls.clear()
    off = Housekeeping(ComputeConfig(manual_gc=True, manual_gc_eval=False), "cpu")
    off.start(), off.after_step(5), off.before_validation(), off.after_validation(), off.stop()
    assert calls.calls == [("gc", 2)] and gc.isenabled()
    calls.calls.clear()
    default = Housekeeping(ComputeConfig(), "cpu")
    default.start(), default.after_step(5), default.before_validation(), default.after_validation(), default.stop()
    assert calls.calls == [] and gc.isenabled()


def test_manual_gc_in_the_training_loop(megatron_cpu, tmp_path, monkeypatch):
    """A run with --manual-gc --manual-gc-interval 2: the collector is off during every step, collections at the
    start, after steps 2 and 4 and around the validation at step 3 and the final one; on again afterwards."""
    from megatron_dataeff.training.loop import Trainer

    cfg = config_from_args(build_parser().parse_args(
        SMALL + ["--run-dir", str(tmp_path), "--manual-gc", "--manual-gc-interval", "2", "--logging-level", "30"]))
    trainer = Trainer(cfg)
    assert logging.getLogger().level == 30
    events = []
    monkeypatch.setattr(housekeeping.gc, "collect", lambda generation=2: events.append(("gc", generation)))
    step = trainer.train_step

    def train_step(i):
        events.append(("step", i + 1, gc.isenabled()))
        return step(i)


    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(trainer.validator, "log_validation", _wrap(trainer.validator.log_validation, events))
    try:
        trainer.train()
    finally:
        trainer.close()
        logging.getLogger().setLevel(logging.WARNING)
    assert gc.isenabled()
    assert events == [("gc", 2), ("step", 1, False), ("step", 2, False), ("gc", 2),
                      ("step", 3, False), ("gc", 2), ("validate",), ("gc", 0),
                      ("step", 4, False), ("gc", 2), ("gc", 2), ("validate",), ("gc", 0)]


def _wrap(fn, events):
    def wrapped(*args, **kwargs):
        events.append(("validate",))
        return fn(*args, **kwargs)
    return wrapped


def test_decoupled_lr_is_the_embedding_and_output_layers(megatron_cpu, tmp_path):
    """--decoupled-lr / --decoupled-min-lr: the input embedding and the output layer follow their own peak and
    final lr through the same warmup and decay; every other parameter follows --lr / --min-lr."""
    from megatron_dataeff.training.loop import Trainer

    cfg = config_from_args(build_parser().parse_args(
        SMALL + ["--run-dir", str(tmp_path), "--untie-embeddings-and-output-weights", "--lr", "1e-3",
                 "--min-lr", "1e-4", "--decoupled-lr", "4e-3", "--decoupled-min-lr", "2e-4", "--lr-warmup-iters",
                 "2", "--lr-decay-style", "linear", "--lr-decay-iters", "4"]))
    trainer = Trainer(cfg)
    try:
        names = {id(p): n for n, p in trainer.model[0].named_parameters()}
        for it in range(4):
            trainer.train_step(it)
            by_lr = {}
            for group in trainer.optimizer.param_groups:
                for p in group["params"]:
                    by_lr.setdefault(group["lr"], set()).add(names.get(id(p), "?"))
            step = it + 1  # the lr the next step uses: warmup 2, linear decay to step 4
            frac = step / 2 if step <= 2 else 1 - (step - 2) / 2
            lr, dlr = (1e-3 * frac, 4e-3 * frac) if step <= 2 else (1e-4 + (1e-3 - 1e-4) * frac,
                                                                   2e-4 + (4e-3 - 2e-4) * frac)
            decoupled = {n for k, v in by_lr.items() if k == pytest.approx(dlr, rel=1e-9) for n in v}
            assert decoupled and all("embedding" in n or "output_layer" in n for n in decoupled), by_lr
            assert any("embedding" in n for n in decoupled) and any("output_layer" in n for n in decoupled)
            rest = {n for k, v in by_lr.items() if k == pytest.approx(lr, rel=1e-9) for n in v}
            assert rest and not rest & decoupled and len(rest) + len(decoupled) == len(names), by_lr
        assert trainer.schedule["--decoupled-lr"] == 4e-3 and trainer.schedule["--decoupled-min-lr"] == 2e-4
    finally:
        trainer.close()


def test_decoupled_min_lr_needs_decoupled_lr(capsys):
    from megatron_dataeff.arguments import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--decoupled-min-lr", "1e-4"])
    assert "--decoupled-min-lr needs --decoupled-lr" in capsys.readouterr().err
    assert "--decoupled-lr" not in __import__("megatron_dataeff.training.optimizer", fromlist=["schedule"]).schedule(
        parse_config([]), 10)
