"""megatron-core's AdamW (optionally the distributed optimizer) and its LR/WD scheduler."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_dataeff.checkpoint.format import CheckpointError
from megatron_dataeff.config import RunConfig

if TYPE_CHECKING:  # for annotations only
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def build_optimizer(cfg: RunConfig, model_chunks: list[DistributedDataParallel]):
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
        # Megatron-LM's --decoupled-lr: megatron-core gives the parameters marked is_embedding_or_output_parameter
        # (input embedding, output layer) a group of their own with this peak and final lr.
        decoupled_lr=o.decoupled_lr,
        decoupled_min_lr=o.decoupled_min_lr,
    )
    with warnings.catch_warnings():
        # megatron-core 0.19 imports its MIMO model here to recognise one, and that import warns that MIMO is
        # experimental; no MIMO model is built here
        warnings.filterwarnings("ignore", message="MimoModelConfig is experimental", category=UserWarning,
                                module=r"megatron\.core\.models\.mimo\.")
        optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
    if cfg.parallel.use_distributed_optimizer:
        for opt, _ in _torch_adams(optimizer):
            _skip_step_in_param_state_copy(opt)
    return optimizer


# megatron-core's distributed optimizer over torch's Adam (no apex / transformer-engine: CPUs, and GPU images
# without them) cannot load a checkpoint as it stands; the two functions below make it, and nothing else
# changes.

def _torch_adams(optimizer):
    """(megatron optimizer, its inner torch Adam) for every part of a (chained) megatron optimizer that has one."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):  # AdamW derives from Adam
            yield opt, inner


def materialise_adam_state(optimizer) -> None:
    """Give a fresh torch Adam zero state (its `step` included) before a load.

    The distributed optimizer reads the per-parameter Adam state, `step` included, while it builds the state
    dict to load into; a fresh torch Adam has none and megatron fails on an assertion. The load overwrites
    these zeros.
    """
    import torch

    for _, inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _skip_step_in_param_state_copy(dist_opt: DistributedOptimizer) -> None:
    """Let megatron-core's distributed optimizer load a checkpoint with torch's Adam (no apex / TE).

    Its `load_state_dict` first puts the checkpoint's `step` into every parameter's torch Adam state, then
    copies each saved parameter state into the live one key by key, over the live keys: `step` is among
    them but not among the saved tensors (megatron keeps it per group), a KeyError. The copy here leaves
    `step` out of that key walk and puts it back after, one tensor per parameter (megatron sets one shared
    tensor, which torch's Adam would then increment once per parameter per step); every other key is copied
    as before.
    """
    original = getattr(dist_opt, "_set_main_param_and_optimizer_states", None)
    index = getattr(dist_opt, "model_param_group_index_map", None)
    if original is None or index is None:
        return

    def set_states(model_param, tensors):
        group, order = index[model_param]
        state = dist_opt.optimizer.state[dist_opt.optimizer.param_groups[group]["params"][order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()  # megatron gives every parameter one shared tensor; Adam
                # increments each parameter's step in place, so they must not share it

    dist_opt._set_main_param_and_optimizer_states = set_states


def schedule(cfg: RunConfig, train_iters: int) -> dict:
    """The schedule a run follows, as effective values keyed by the flag that sets each (what a resume
    compares with the checkpoint's; None where a value does not apply).  Lengths count iterations, or
    samples with --train-samples (as Megatron-LM; the scheduler then steps by the global batch).

    --train-iters itself is not part of it: stopping a run early or letting it go on changes no lr or
    weight decay unless the decay length follows it (no --lr-decay-iters), and then --lr-decay-iters differs.
    """
    o = cfg.optim
    if o.train_samples is not None:
        unit, total, warmup, decay, wsd_given = "samples", o.train_samples, o.lr_warmup_samples, \
            o.lr_decay_samples, o.lr_wsd_decay_samples
    else:
        unit, total, warmup, decay, wsd_given = "iterations", train_iters, o.lr_warmup_iters, o.lr_decay_iters, \
            o.lr_wsd_decay_iters
    decay = decay or total
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay  # Megatron-LM: a fraction of the decay steps, not rounded
    wsd = o.lr_decay_style == "WSD"
    suffix = "samples" if unit == "samples" else "iters"
    return {
        "unit": unit,
        "--lr": o.lr,
        "--min-lr": o.min_lr,
        f"--lr-warmup-{suffix}": warmup,
        "--lr-decay-style": o.lr_decay_style,
        f"--lr-decay-{suffix}": decay,
        f"--lr-wsd-decay-{suffix}": (wsd_given or max(1, int(0.1 * decay))) if wsd else None,
        "--lr-wsd-decay-style": o.lr_wsd_decay_style if wsd else None,
        "--weight-decay": o.weight_decay,
        "wd_incr_steps": max(1, total),
        # The embedding and output layer's own peak and final lr (recorded only when given).
        **({"--decoupled-lr": o.decoupled_lr,
            "--decoupled-min-lr": o.min_lr if o.decoupled_min_lr is None else o.decoupled_min_lr}
           if o.decoupled_lr is not None else {}),
    }


def scheduler_increment(values: dict, global_batch_size: int) -> int:
    """Scheduler steps per iteration: 1, or the global batch when the schedule counts samples."""
    return global_batch_size if values.get("unit") == "samples" else 1


def schedule_from_scheduler_state(state: dict) -> dict:
    """The part of `schedule` a megatron scheduler state holds (checkpoints written before `schedule` was
    recorded)."""
    return {"--lr": state.get("max_lr"), "--min-lr": state.get("min_lr"), "unit": "iterations",
            "--lr-warmup-iters": state.get("lr_warmup_steps"), "--lr-decay-style": state.get("lr_decay_style"),
            "--weight-decay": state.get("start_wd")}


def schedule_differences(saved: dict, now: dict, cfg: RunConfig) -> list[str]:
    """'--flag: checkpoint X, this run Y' for every value both record and that differ."""
    o = cfg.optim
    notes = {"--lr-decay-iters": " (not given: --train-iters)" if o.lr_decay_iters is None else "",
             "--lr-decay-samples": " (not given: --train-samples)" if o.lr_decay_samples is None else "",
             "--lr-wsd-decay-iters": " (not given: 10% of decay)" if o.lr_wsd_decay_iters is None else "",
             "--lr-wsd-decay-samples": " (not given: 10% of decay)" if o.lr_wsd_decay_samples is None else ""}
    if o.lr_warmup_fraction is not None:
        notes["--lr-warmup-iters"] = notes["--lr-warmup-samples"] = " (from --lr-warmup-fraction)"
    names = {"unit": "schedule unit (--train-iters or --train-samples)"}
    decoupled = [f"{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}"
                 for k in ("--decoupled-lr", "--decoupled-min-lr") if saved.get(k) != now.get(k)]
    return [f"{names.get(k, k)}{notes.get(k, '')}: checkpoint {saved[k]!r}, this run {now[k]!r}" for k in now
            if k in saved and k != "wd_incr_steps" and not k.startswith("--decoupled") and saved[k] is not None
            and saved[k] != now[k]] + decoupled


def build_scheduler(cfg: RunConfig, optimizer, train_iters: int, values: dict | None = None) -> OptimizerParamScheduler:
    """LR warmup then constant / linear / cosine / WSD decay, stepped by `scheduler_increment` per iteration;
    `values` (a `schedule` dict, e.g. a checkpoint's) replaces the command line's."""
    v = values or schedule(cfg, train_iters)
    suffix = "samples" if v["unit"] == "samples" else "iters"
    warmup = v[f"--lr-warmup-{suffix}"]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else v["--lr"],
        max_lr=v["--lr"],
        min_lr=v["--min-lr"],
        lr_warmup_steps=warmup,
        lr_decay_steps=max(v[f"--lr-decay-{suffix}"], warmup + 1),
        lr_decay_style=v["--lr-decay-style"],
        start_wd=v["--weight-decay"],
        end_wd=v["--weight-decay"],
        wd_incr_steps=v["wd_incr_steps"],
        wd_incr_style="constant",
        # Differences from the checkpoint are settled before loading (`resume_schedule`); the
        # scheduler built here is the one to follow.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=v[f"--lr-wsd-decay-{suffix}"],
        lr_wsd_decay_style=v["--lr-wsd-decay-style"],
    )


def check_schedule(cfg: RunConfig, optimizer, now: dict, ckpt: str, meta: dict) -> list[str]:
    """The differences between a checkpoint's schedule and the command line's `now`; an error unless the command
    line says which to follow.  Asked before the optimizer state is loaded: megatron-core >= 0.19 matches saved
    parameter groups by their learning rates and would fail first, with its own message; so the groups take the
    checkpoint's rates for the load (`resume_schedule` gives them the followed schedule's after it)."""
    saved = _saved_schedule(meta)
    diffs = schedule_differences(saved, now, cfg)
    ck = cfg.checkpoint
    if diffs and not (ck.override_opt_param_scheduler or ck.use_checkpoint_opt_param_scheduler):
        raise CheckpointError(
            f"{ckpt}: its schedule differs from this command line's:\n  " + "\n  ".join(diffs) +
            "\npass --override-opt-param-scheduler to follow the command line (e.g. to extend the run) or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")
    if diffs and saved.get("--lr") is not None and saved.get("--min-lr") is not None:
        set_group_lrs(optimizer, {**now, **{k: v for k, v in saved.items() if v is not None}})
    return diffs


def _saved_schedule(meta: dict) -> dict:
    """A checkpoint's schedule: its record, or what its scheduler state says (older checkpoints)."""
    return meta.get("schedule") or schedule_from_scheduler_state(meta.get("scheduler", {}))


def set_group_lrs(optimizer, values: dict) -> None:
    """Give every parameter group the peak and floor learning rates of the schedule `values` (--lr / --min-lr, or
    --decoupled-lr / --decoupled-min-lr for the groups megatron-core marks decoupled): megatron's scheduler reads
    them from the groups, and megatron-core >= 0.19 finds a checkpoint's groups by them."""
    for group in optimizer.param_groups:
        if "max_lr" not in group:
            continue
        decoupled = group.get("is_decoupled_lr") and values.get("--decoupled-lr") is not None
        group["max_lr"] = values["--decoupled-lr" if decoupled else "--lr"]
        group["min_lr"] = values["--decoupled-min-lr" if decoupled else "--min-lr"]


def resume_schedule(cfg: RunConfig, optimizer, train_iters: int, now: dict, scheduler: OptimizerParamScheduler,
                    ckpt: str, meta: dict, print_fn=print) -> tuple[dict, OptimizerParamScheduler]:
    """(schedule, scheduler) that continue a checkpoint's at its step: the command line's schedule `now` and
    `scheduler`, or the checkpoint's where they differ and --use-checkpoint-opt-param-scheduler says so.  A
    difference is an error unless the command line says which to follow (Megatron-LM's
    --override-opt-param-scheduler / --use-checkpoint-opt-param-scheduler): `check_schedule` has refused it before
    the optimizer state was loaded."""
    diffs = schedule_differences(_saved_schedule(meta), now, cfg)
    ck = cfg.checkpoint
    if diffs and ck.override_opt_param_scheduler:
        set_group_lrs(optimizer, now)  # the groups were loaded with the checkpoint's rates
    if diffs and ck.use_checkpoint_opt_param_scheduler and meta.get("schedule"):
        now = dict(meta["schedule"])
        scheduler = build_scheduler(cfg, optimizer, train_iters, now)
    elif diffs and ck.use_checkpoint_opt_param_scheduler:
        scheduler.override_opt_param_scheduler = False
        scheduler.use_checkpoint_opt_param_scheduler = True
    scheduler.load_state_dict(meta["scheduler"])
    if diffs:
        which = "the checkpoint's" if ck.use_checkpoint_opt_param_scheduler else "this command line's"
        print_fn(f" schedule: following {which} where they differ ({'; '.join(diffs)})")
    return now, scheduler
