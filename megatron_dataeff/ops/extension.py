"""The compiled kernels of csrc/, loaded once, and which implementation each device uses.

    megatron_dataeff._C        CPU kernels (built by `pip install --no-build-isolation -e .`)
    megatron_dataeff._C_cuda   CUDA kernels (built only where torch has CUDA and nvcc exists)

A missing or broken build is reported once, at import, by an `ExtensionWarning`; the ops then run their
plain-torch references.  `implementation(device)` says which one a device gets ("cuda", "cpp" or
"torch"); `IMPLEMENTATION` is that answer for the default device.  MEGATRON_DATAEFF_FORCE_REFERENCE=1,
`force_reference()` (a context manager) or `set_force_reference(True)` make every op use the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

FORCE_ENV = "MEGATRON_DATAEFF_FORCE_REFERENCE"


class ExtensionWarning(UserWarning):
    """The compiled extension is missing or failed to load; the torch reference is used instead."""


def _load(name: str):
    """(module, None) or (None, the exception that stopped its import)."""
    try:
        return importlib.import_module(f"megatron_dataeff.{name}"), None
    except Exception as exc:  # noqa: BLE001 - an ImportError, or an OSError/undefined symbol of a stale build
        return None, exc


_C, _C_ERROR = _load("_C")
_C_cuda, _C_CUDA_ERROR = _load("_C_cuda")
_forced = os.environ.get(FORCE_ENV, "0").strip() not in ("", "0")


def _report() -> None:
    problems = []
    if _C is None:
        problems.append(f"megatron_dataeff._C (CPU kernels) is unavailable ({_C_ERROR})")
    if _C_cuda is None and torch.cuda.is_available():
        problems.append(f"megatron_dataeff._C_cuda (CUDA kernels) is unavailable ({_C_CUDA_ERROR})")
    if problems and not _forced:
        warnings.warn(
            "; ".join(problems) + ". Using the plain-torch reference kernels (same numbers, slower). "
            "Build with `pip install --no-build-isolation -e .` (see csrc/README.md).",
            ExtensionWarning, stacklevel=3,
        )


_report()


def implementation(device: torch.device | str | None = None) -> str:
    """"cuda", "cpp" or "torch": what the ops run for tensors on `device` (default: CUDA if available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if _forced:
        return "torch"
    if kind == "cuda" and _C_cuda is not None:
        return "cuda"
    if kind == "cpu" and _C is not None:
        return "cpp"
    return "torch"


def forced() -> bool:
    """Whether every op is forced onto its torch reference (MEGATRON_DATAEFF_FORCE_REFERENCE, force_reference)."""
    return _forced


def set_force_reference(value: bool) -> None:
    """Make every op use its torch reference (True) or the extension where built (False)."""
    global _forced, IMPLEMENTATION
    _forced = bool(value)
    IMPLEMENTATION = implementation()


@contextlib.contextmanager
def force_reference(value: bool = True):
    """Within the block, ops use their torch reference (or, with value=False, the extension where built)."""
    old = _forced
    set_force_reference(value)
    try:
        yield
    finally:
        set_force_reference(old)


def cpu_module():
    """megatron_dataeff._C, or None."""
    return _C


def cuda_module():
    """megatron_dataeff._C_cuda, or None."""
    return _C_cuda


def load_error(device: str = "cuda") -> Exception | None:
    """Why the extension of `device` ("cuda" or "cpu") did not load (None when it did)."""
    return _C_CUDA_ERROR if torch.device(device).type == "cuda" else _C_ERROR


def cuda_stream(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream of `device`, for the _C_cuda launchers."""
    return torch.cuda.current_stream(device).cuda_stream


IMPLEMENTATION = implementation()
