"""megatron-core's torch.compile'd functions compiled when first called, not when megatron-core is imported.

megatron-core decorates about forty functions (`megatron/core/fusions/` and others) with its `jit_fuser`, which is
`torch.compile` on torch >= 2.2, and from 0.19 a MoE router method with `@torch.compile` itself.  `torch.compile(fn)`
traces nothing until the first call, but building its wrapper imports TorchDynamo and TorchInductor: about 2 s of
every process's start-up, in every tool and every worker, whether or not a compiled function ever runs.

`install()` (called by the package's `__init__`, before anything of ours imports megatron-core) makes
`torch.compile`, while a module of megatron-core is being executed at import, a decorator that calls the real
`torch.compile(fn, ...)` with the same arguments at the function's first call and the compiled function after
that (so megatron-core's `jit_fuser`, bound then, is that decorator too).  What runs is unchanged; only the import
of the compiler moves to the first use.  Outside megatron-core's imports `torch.compile` is torch's own.  Nothing
here imports torch or megatron-core before megatron-core itself is imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

PACKAGE = "megatron.core"


def deferred(compile_fn):
    """A decorator like `compile_fn` (torch.compile's signature: `f(fn, **options)` or `f(**options)(fn)`) that
    calls it on the function's first call."""

    def decorate(fn=None, **options):
        if fn is None:  # @jit_fuser(...) with options
            return functools.partial(decorate, **options)
        compiled = []

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(compile_fn(fn, **options))
            return compiled[0](*args, **kwargs)

        call.__wrapped_by_deferred_compile__ = compile_fn
        return call

    return decorate


class _MegatronFinder(importlib.abc.MetaPathFinder):
    """Finds megatron-core's modules as the path finder does, and runs each with `torch.compile` deferred."""

    depth = 0  # megatron-core modules being executed (one imports the next)

    def find_spec(self, name, path=None, target=None):
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            import torch  # megatron-core imports it first thing anyway

            outermost = _MegatronFinder.depth == 0
            real = torch.compile
            if outermost:
                torch.compile = deferred(real)
            _MegatronFinder.depth += 1
            try:
                run_module(module)
            finally:
                _MegatronFinder.depth -= 1
                if outermost:
                    torch.compile = real

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Defer megatron-core's compiled functions to their first call (once per process; a no-op once megatron-core
    is imported)."""
    if PACKAGE in sys.modules or any(isinstance(f, _MegatronFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MegatronFinder())
