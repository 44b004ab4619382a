"""A checkpoint read outside training: its run config at TP=PP=1 on this machine, a dual model's view.

Export, evaluation and generation build the model of a checkpoint saved at any TP/PP layout in one process;
`inference_config` is the one place the saved config is adapted for that (`inference/loading.py` builds and
loads the model from it).
"""

from __future__ import annotations

from dataclasses import replace

from megatron_dataeff.checkpoint.format import CheckpointError, check_checkpoint_files, read_metadata, resolve_checkpoint
from megatron_dataeff.config import RunConfig
from megatron_dataeff.errors import ConfigError
from megatron_dataeff.models.attention_backends import attention_for_config
from megatron_dataeff.models.layer_specs import transformer_engine_available
from megatron_dataeff.objectives import objective_class

def objective_view(objective, view: str | None, ckpt: str = "the checkpoint"):
    """The ObjectiveConfig a checkpoint is used as: a model of several views (dual) as `view` (required), any
    other as itself (`view`, when given, must be its own objective)."""
    views = objective_class(objective).evaluation_views
    if len(views) > 1:
        if view not in views:
            raise CheckpointError(f"{ckpt} was trained with --objective {objective.name}: it is a causal LM and a "
                                  f"diffusion model with the same weights; say which with "
                                  f"{' or '.join(f'--view {v}' for v in views)}")
        return replace(objective, name=view, ar_fraction=None)
    if view is not None and view != objective.name:
        raise CheckpointError(f"{ckpt} was trained with --objective {objective.name}; --view {view} is only for "
                              f"--objective dual checkpoints")
    return objective


def inference_config(path: str, iteration: int | None = None, device: str = "cpu", view: str | None = None):
    """(checkpoint directory, RunConfig at TP=PP=1 on `device`, metadata) of a checkpoint read outside training:
    the run's config with a kernel this machine has and, for a dual model, the `view` asked for."""
    ckpt = resolve_checkpoint(path, iteration)
    meta = read_metadata(ckpt)
    check_checkpoint_files(ckpt, meta)
    cfg = RunConfig.from_dict(meta["config"])
    cfg.objective = objective_view(cfg.objective, view, ckpt)
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.device = device
    cfg.optim.global_batch_size = None
    _runnable_attention(cfg, device)
    cfg.validate_layout(1)
    return ckpt, cfg, meta


def _runnable_attention(cfg, device: str) -> None:
    """Keep the checkpoint's --attention-backend where this machine runs it; otherwise (a GPU run with
    transformer-engine's fused kernel, read on a CPU) take `auto`: the kernel changes speed, not the model."""
    try:
        attention_for_config(cfg, device, transformer_engine_available())
    except ConfigError:
        cfg.compute.attention_backend = "auto"
