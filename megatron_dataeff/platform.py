"""CPU support for megatron-core: the only module that knows megatron-core was written for CUDA.

megatron-core assumes a GPU in a few places.  `enable_cpu_support()` makes those places work on
CPUs with gloo, and is applied only when training runs on CPUs (`--device cpu`, or no GPU); the
GPU path never calls it.  What it does, and why (measured with megatron-core 0.16.1, torch 2.13):

* device placement: `torch.cuda.current_device()`, `.cuda()`, `device="cuda"` and integer device
  arguments appear throughout megatron-core.  A `TorchFunctionMode` maps CUDA devices to CPU for
  every tensor factory / `.to()` call, `Tensor.cuda` is the identity, `current_device()` is 0 and
  `synchronize/empty_cache/set_device` do nothing.
* random numbers: megatron's RNG tracker saves and restores "CUDA" generator states; they are
  redirected to the CPU generator.  `torch.cuda.manual_seed` seeds `torch.default_generator`
  directly, because `torch.manual_seed` itself calls `torch.cuda.manual_seed_all` (recursion).
* type strings: grad clipping and the mixed-precision optimizer check `param.type()` against
  `torch.cuda.FloatTensor` / `torch.cuda.BFloat16Tensor`; the no-argument `Tensor.type()` reports
  the `torch.cuda.` name for CPU tensors.
* backward: a `TorchFunctionMode` is off while its own handler runs, and `Tensor.backward` /
  `torch.autograd.backward` dispatch to it; the mode runs them with itself active, so that the
  forwards activation recomputation replays in backward see the CPU mapping too.
* streams: from megatron-core 0.19 DDP's grad sync waits on `torch.cuda.current_stream()` even
  without overlap; `current_stream()` returns a stream whose waits and syncs do nothing (CPU
  work is ordered already).
* config: the fusions (`masked_softmax_fusion`, `bias_activation_fusion`, ...) need CUDA kernels
  and DDP's overlapped grad reduce needs CUDA streams; `cpu_config_overrides()` turns them off.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

from megatron_dataeff.errors import ConfigError

_ENABLED = False
_MODE: "TorchFunctionMode | None" = None


def gpu_available() -> bool:
    """True when CUDA can be used by this process."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def resolve_device(device: str) -> str:
    """'cuda' or 'cpu' for a `--device` value of auto/cuda/cpu."""
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise ConfigError("--device cuda was given but no GPU is available; use --device cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    return device


def _to_cpu_device(value):
    if isinstance(value, torch.device):
        return torch.device("cpu") if value.type == "cuda" else value
    if isinstance(value, str):
        return "cpu" if value.startswith("cuda") else value
    if isinstance(value, int) and not isinstance(value, bool):
        return "cpu"
    return value


def _run_backward_in_mode(mode, func, args, kwargs):
    """`Tensor.backward` / `torch.autograd.backward` with `mode` active while the graph runs.

    A mode is off while its own `__torch_function__` runs, so a plain `func(*args)` would run the
    whole backward pass without the CPU mapping; the forwards that activation recomputation replays
    there create "cuda" tensors.  The engine is called directly (as megatron's schedules do)."""
    import inspect

    from torch.autograd.variable import Variable

    bound = inspect.signature(func).bind(*args, **kwargs).arguments
    if func is torch.Tensor.backward:
        tensors, grads = (bound["self"],), (bound.get("gradient"),)
    else:
        tensors = bound["tensors"]
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = bound.get("grad_tensors")
        grads = (grads,) if grads is None or isinstance(grads, torch.Tensor) else tuple(grads)
        grads = grads * len(tensors) if len(grads) == 1 and len(tensors) > 1 and grads[0] is None else grads
    made = []
    for t, g in zip(tensors, grads):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t)
        made.append(g)
    create = bool(bound.get("create_graph", False))
    retain = bound.get("retain_graph")
    inputs = bound.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    with mode:
        Variable._execution_engine.run_backward(tensors, tuple(made), create if retain is None else retain,
                                                create, inputs, allow_unreachable=True, accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=` arguments and `.to(cuda)` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _run_backward_in_mode(self, func, args, kwargs)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros,
                    torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor):
            args = tuple(
                _to_cpu_device(a) if isinstance(a, (torch.device, str)) or
                (func is torch.Tensor.to and isinstance(a, int) and not isinstance(a, bool) and i == 1)
                else a
                for i, a in enumerate(args)
            )
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda"):
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state, device=-1, *args, **kwargs):
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


class _CpuStream:
    """What `torch.cuda.current_stream()` returns on CPUs: work is already in program order."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


_CPU_STREAM = _CpuStream()


@functools.cache
def _original_type():
    return torch.Tensor.type


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    original = _original_type()
    if dtype is None and not kwargs and self.device.type == "cpu":
        name = original(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name
    return original(self, dtype, non_blocking, **kwargs)


def enable_cpu_support() -> None:
    """Make megatron-core run on CPUs (idempotent). Call before building models."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    _ENABLED = True
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _CPU_STREAM
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    cuda.random.manual_seed = _cpu_manual_seed
    cuda.random.manual_seed_all = _cpu_manual_seed
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    _original_type()
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _cuda_named_type

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.default_generator.get_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.default_generator.set_state(new_state)

    # The RNG tracker warns when the CPU generator moves inside a "GPU" fork; on CPUs the two
    # generators are one, so the warning says nothing.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()


def cpu_config_overrides() -> dict:
    """TransformerConfig fields that must be off on CPUs (no fused CUDA kernels)."""
    return dict(
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=True,
    )


def distributed_backend(device: str) -> str:
    """The torch.distributed backend for a device: nccl on GPUs, gloo on CPUs."""
    return "nccl" if device == "cuda" else "gloo"


def host_memory_bytes() -> int:
    """This machine's memory for one process: physical memory (its cgroup's limit when lower) divided by the
    processes torchrun started on it (LOCAL_WORLD_SIZE)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
        break
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def memory_at_hand(device: str) -> int:
    """Bytes this process may fill: the current GPU's total memory, or on CPUs `host_memory_bytes()`."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return host_memory_bytes()
