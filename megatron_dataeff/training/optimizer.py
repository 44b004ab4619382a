"""megatron-core's AdamW (optionally the distributed optimizer) and its LR/WD scheduler."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_dataeff.config import RunConfig


def build_optimizer(cfg: RunConfig, model_chunks: list):
    """AdamW with decoupled weight decay (not on norms and biases), grad clipping, bf16 master weights."""
    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=o.bf16,
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        decoupled_weight_decay=True,
    )
    return get_megatron_optimizer(opt_cfg, model_chunks)


def build_scheduler(cfg: RunConfig, optimizer, train_iters: int) -> OptimizerParamScheduler:
    """LR warmup then constant / linear / cosine / WSD decay, stepped once per iteration."""
    o = cfg.optim
    decay_iters = o.lr_decay_iters or train_iters
    wsd_iters = None
    if o.lr_decay_style == "WSD":
        wsd_iters = o.lr_wsd_decay_iters or max(1, int(0.1 * decay_iters))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_iters > 0 else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, o.lr_warmup_iters + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(1, train_iters),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd_iters,
        lr_wsd_decay_style=o.lr_wsd_decay_style if o.lr_decay_style == "WSD" else None,
    )
