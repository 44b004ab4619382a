"""Modules imported on first use, for the parts of the package that must be importable without torch.

The objectives' traits (`objectives/`) are read by the configuration and the memory estimate, which answer
on a login node without importing torch; their batch code needs torch and the masking ops.  Such a module
names its heavy imports at the top, `torch = lazy_module("torch")`, so the dependency stays visible, and the
import happens when the first attribute is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    """Stands for a module until an attribute is used; then every lookup goes to the imported module."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> ModuleType:
    """The module `name`, imported when one of its attributes is first read (a cached lookup after that)."""
    return _LazyModule(name)  # type: ignore[return-value]
