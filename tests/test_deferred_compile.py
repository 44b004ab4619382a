"""megatron-core's torch.compile'd functions are compiled at their first call, not at import
(megatron_dataeff/deferred_compile.py)."""

import subprocess
import sys

from megatron_dataeff.deferred_compile import deferred
from tests.conftest import ROOT, child_env


def test_importing_the_trainer_builds_no_compiler_and_leaves_torch_compile_alone():
    """After our trainer (and so megatron-core) is imported: TorchDynamo is not loaded, torch.compile is torch's
    own again, and megatron-core's fused functions (jit_fuser's and the MoE router's @torch.compile) hold the
    real torch.compile for their first call."""
    code = """
import sys
import torch
import megatron_dataeff.training.loop
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer.moe import router
assert 'torch._dynamo' not in sys.modules, 'the compiler was imported'
assert torch.compile.__module__ == 'torch', torch.compile
assert fused_bias_swiglu.bias_swiglu.__wrapped_by_deferred_compile__ is torch.compile
compiled = [f for c in vars(router).values() if isinstance(c, type) for f in vars(c).values()
            if hasattr(getattr(f, '__func__', f), '__wrapped_by_deferred_compile__')]
print('ok', len(compiled))
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         env=child_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok"), out.stdout


def test_a_deferred_function_compiles_once_at_its_first_call_with_the_same_options():
    calls = []

    def fake_compile(fn, **options):
        calls.append((fn.__name__, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    @deferred(fake_compile)
    def plain(x):
        return x + 1

    @deferred(fake_compile)(dynamic=False, mode="max-autotune")
    def with_options(x, y=0):
        return x * y

    assert calls == [] and plain.__name__ == "plain"
    assert plain(1) == ("compiled", 2) and plain(2) == ("compiled", 3)
    assert with_options(2, y=3) == ("compiled", 6)
    assert calls == [("plain", {}), ("with_options", {"dynamic": False, "mode": "max-autotune"})]
