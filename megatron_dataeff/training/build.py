"""Building a run: the checks that must pass before any work, the data it reads, and the model with its
optimizer (megatron-core's DDP wrapper and distributed optimizer)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from megatron_dataeff.config import ConfigError, RunConfig
from megatron_dataeff.data.blending import parse_data_path, run_data_path
from megatron_dataeff.data.indexed import IndexedFormatError, check_token_ids
from megatron_dataeff.models.builder import build_model, count_parameters
from megatron_dataeff.distributed import Runtime, all_reduce_cpu, barrier
from megatron_dataeff.training.optimizer import build_optimizer


def check_device_flags(cfg: RunConfig, device: str) -> None:
    """Refuse, by name, what the device cannot do (before any model is built)."""
    p = cfg.parallel
    if device == "cpu":
        for flag, on in (("--overlap-grad-reduce", p.overlap_grad_reduce),
                         ("--overlap-param-gather", p.overlap_param_gather)):
            if on:
                raise ConfigError(f"{flag} overlaps communication on CUDA streams; it needs GPUs (running on CPUs)")


def resolve_data_path(cfg: RunConfig, tokenizer, runtime: Runtime) -> list[str]:
    """`--data-path` items to train on (checked to exist), else the embedded corpus prefix, which rank 0
    tokenizes and caches before the others read it."""
    if not cfg.data.data_path and runtime.rank == 0:
        run_data_path(cfg, tokenizer)
    if not cfg.data.data_path:
        barrier()
    return run_data_path(cfg, tokenizer)


def check_vocabulary(data_path: list[str], vocab_size: int, runtime: Runtime) -> None:
    """Every dataset's token ids fit the tokenizer (before any model is built). Rank 0 reads the `.bin`
    files once and tells every rank, so a job does not read its data set once per process."""
    error = ""
    if runtime.rank == 0:
        prefixes, _ = parse_data_path(list(data_path))
        try:
            for prefix in prefixes:
                check_token_ids(prefix, vocab_size)
        except (IndexedFormatError, OSError) as exc:  # every rank must hear of it, or the others would wait
            error = f"--data-path {exc}"
    if dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ConfigError(error)


def train_iters_of(cfg: RunConfig, samples_per_epoch: int) -> int:
    """Optimizer steps of the run: --train-iters, else whole global batches of --train-samples (Megatron-LM),
    else --epochs of the data-constrained stream."""
    gbs = cfg.optim.global_batch_size
    if cfg.optim.train_iters is not None:
        return cfg.optim.train_iters
    if cfg.optim.train_samples is not None:
        return cfg.optim.train_samples // gbs
    if cfg.data.epochs is not None:
        return max(1, math.ceil(cfg.data.epochs * samples_per_epoch / gbs))
    raise ConfigError("give --train-iters, --train-samples or --epochs")


@dataclass
class ModelParts:
    """This rank's model stage wrapped for data parallelism, and its optimizer."""

    model: list  # [DistributedDataParallel]: the model chunks megatron's schedules take
    optimizer: object  # megatron-core's (distributed) optimizer
    num_parameters: int  # over every model-parallel rank (one data-parallel replica)

    @property
    def module(self):
        """The unwrapped GPTModel of this stage (what checkpoints shard)."""
        return self.model[0].module


def build_model_and_optimizer(cfg: RunConfig, vocab_ids: int, runtime: Runtime) -> ModelParts:
    """This rank's model (`models.builder.build_model`) in megatron's DDP, and the optimizer; the transformer
    config carries the hooks megatron's schedules call (no_sync, finalize grads, loss scaling)."""
    model = build_model(cfg, vocab_ids, runtime.device)
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not p.grad_reduce_in_bf16,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        bucket_size=p.ddp_bucket_size,
        check_for_nan_in_grad=False,
    )
    chunks = [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)]
    optimizer = build_optimizer(cfg, chunks)
    tc = model.config
    tc.no_sync_func = chunks[0].no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    totals = all_reduce_cpu(torch.tensor([count_parameters(model)], dtype=torch.float64), runtime.device,
                            group=parallel_state.get_model_parallel_group())
    return ModelParts(chunks, optimizer, int(totals.item()))


@contextlib.contextmanager
def params_synced(chunks: list, overlap_param_gather: bool):
    """Parameters all-gathered and the overlap hooks off (evaluation, checkpoints), as Megatron-LM does
    with --overlap-param-gather: the optimizer leaves the gather to the next forward's hooks."""
    if overlap_param_gather:
        for m in chunks:
            m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if overlap_param_gather:
            for m in chunks:
                m.enable_forward_pre_hook()
