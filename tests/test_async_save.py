"""--async-save's background writer is one the installed megatron-core has (its own, NVRx's), named at start-up; a run
prints no megatron-core notice that our calls cause and no user can act on (deprecations, experimental features)."""

import importlib.util
import subprocess
import sys

import pytest
from packaging.version import Version

from tests.conftest import ROOT, child_env

MEGATRON_NOTICES = ("deprecat", "experimental")  # what megatron-core's notices say, lower-cased
NVRX = importlib.util.find_spec("nvidia_resiliency_ext") is not None
own_writer = pytest.mark.skipif(NVRX, reason="nvidia-resiliency-ext is installed: --async-save uses its writer")


@own_writer
def test_async_save_uses_a_writer_the_installed_release_has():
    """Without nvidia-resiliency-ext: megatron-core's own queue, and from 0.17 (where `dist_checkpointing.save`
    defaults to NVRx's writer) requests made for that queue."""
    from megatron_dataeff.checkpoint import async_save
    from megatron_dataeff.checkpoint.format import megatron_core_version

    queue = async_save.open_queue()
    assert type(queue).__module__.startswith("megatron.core.dist_checkpointing."), type(queue)
    expected = {} if Version(megatron_core_version()).release < (0, 17) else {"async_strategy": "mcore"}
    assert async_save.save_kwargs(queue) == expected
    assert async_save.save_kwargs(None) == {}
    assert "megatron-core's own writer" in async_save.describe(queue)


@own_writer
def test_a_release_without_a_writer_is_refused_by_name(monkeypatch):
    """A release whose own writer is gone (`get_async_strategy("mcore")` unsupported) without NVRx installed:
    --async-save is refused, naming the flag and the package to install."""
    from megatron_dataeff.checkpoint import async_save
    from megatron_dataeff.errors import ConfigError

    real = async_save._megatron_strategies()
    if real is None:
        pytest.skip("megatron-core < 0.17 has one writer, its own, and no choice of it")

    def without_own(strategy, module=None):
        if strategy == "mcore":
            raise TypeError(f"async_strategy {strategy} is not supported. Available strategies: nvrx.")
        return real(strategy, module)  # "nvrx": megatron-core's own ImportError without nvidia-resiliency-ext

    monkeypatch.setattr(async_save, "_megatron_strategies", lambda: without_own)
    with pytest.raises(ConfigError, match="--async-save: .* pip install nvidia-resiliency-ext, or drop --async-save"):
        async_save.open_queue()


@own_writer
def test_a_run_prints_no_megatron_notice_and_names_its_writer(tmp_path):
    """A plain run with checkpoints saved in the background: the start-up line names the writer, and nothing
    megatron-core prints is a deprecation or experimental-feature notice."""
    cmd = [sys.executable, str(ROOT / "pretrain_diffusion.py"), "--num-layers", "2", "--hidden-size", "64",
           "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--train-iters", "2", "--device", "cpu", "--tensorboard-dir", "", "--eval-iters", "0",
           "--run-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ckpt"), "--save-interval", "1",
           "--async-save"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "--async-save: checkpoints are written in the background by megatron-core's own writer" in out, out
    notices = [line for line in out.splitlines() if any(word in line.lower() for word in MEGATRON_NOTICES)]
    assert not notices, "\n".join(notices)
