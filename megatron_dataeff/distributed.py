"""Process groups, devices and seeds: torch.distributed + megatron-core's parallel state."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_dataeff import platform


@dataclass
class Runtime:
    """Where this process sits in the job."""

    device: str  # "cuda" or "cpu"
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    is_first_stage: bool
    is_last_stage: bool

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 writes logs, metrics and run records."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_store(timeout: datetime.timedelta):
    """The store this worker group's process groups rendezvous in, when torchrun's elastic agent restarted the
    group (`--max-restarts`); None otherwise (torch's own env:// rendezvous).

    A static rendezvous (torchrun's default, `--master-port` fixed) hands every generation of workers the agent's
    one TCPStore, and the keys the previous generation wrote stay there: gloo's and megatron's groups are named
    by a counter that starts again from 0, so a restarted rank reads its dead peers' addresses and fails to
    connect, or waits for them until --distributed-timeout-minutes.  A prefix per restart
    (TORCHELASTIC_RESTART_COUNT) gives each generation keys of its own."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart == "0":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size_from_env(),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"megatron_dataeff/restart_{restart}", agent)


def world_size_from_env() -> int:
    """Processes in the job (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(tp: int, pp: int, seed: int, device_flag: str = "auto", timeout_minutes: int = 30) -> Runtime:
    """Start torch.distributed (a 1-process group when run without torchrun), megatron's parallel
    state and every random seed. CPU support is enabled first when running on CPUs."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    device = platform.resolve_device(device_flag)
    if device == "cpu":
        platform.enable_cpu_support()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _restart_store(timeout)
        dist.init_process_group(backend=platform.distributed_backend(device), timeout=timeout, store=store,
                                **({} if store is None else dict(rank=int(os.environ["RANK"]),
                                                                  world_size=world_size_from_env())))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp,
                                                 distributed_timeout_minutes=timeout_minutes)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed + 100 * pp_rank)
    np.random.seed((seed + 100 * pp_rank) % 2**32)
    torch.manual_seed(seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(seed)
    return Runtime(
        device=device,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=pp_rank,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        is_first_stage=parallel_state.is_pipeline_first_stage(),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
    )


def all_reduce_cpu(t: torch.Tensor, device: str, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce a small tensor (on the CPU or the run's device) over ranks (NCCL needs it on the GPU); returns it on
    the CPU."""
    if dist.get_world_size() == 1:
        return t.cpu()
    work = t.to("cuda") if device == "cuda" else t
    dist.all_reduce(work, group=group, op=op)
    return work.cpu()


def barrier() -> None:
    """All ranks wait here."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear down megatron's groups and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def owned_process_group():
    """Tear down at exit the process group (and megatron's state) that this block starts.

    A tool called in-process under a live group (a test, a notebook) leaves that group alone.
    """
    owns = not dist.is_initialized()
    try:
        yield
    finally:
        if owns:
            shutdown()
