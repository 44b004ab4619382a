"""The trainer's checkpoints: when and what it saves (its TrainState, schedule and facts beside the model and
optimizer) and how a run resumes, through the checkpoint layer (`megatron_dataeff.checkpoint`), which is handed
explicit parts and knows no trainer.

`--load` resumes one of our checkpoints (model, optimizer, RNG, position, schedule), or reads only the weights:
with --finetune, from a model-only checkpoint (e.g. imported from Hugging Face), or from a Megatron-LM
checkpoint (`checkpoint/megatron_lm.py`); those start at iteration 0 with a fresh optimizer.  What --load names is
found and verified against the sizes and checksums its metadata records by the checkpoint layer
(`checkpoint.state.checkpoint_to_load`: a --save directory falls back to its newest intact checkpoint, a named
iter_N directory is refused when damaged).  RNG states are restored when the layout is the one they were saved
at, on the same kind of device (dropout masks then continue exactly); otherwise they are reseeded.  A checkpoint
of transformer-engine's layer spec loads into the local spec and back (`checkpoint/storage.fit_request`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_dataeff.checkpoint import async_save, megatron_lm, state
from megatron_dataeff.checkpoint.format import (check_checkpoint_files, check_compatible, checkpoint_name,
                                                is_megatron_lm_checkpoint, latest_marker, read_metadata)
from megatron_dataeff.checkpoint.state import Placement, TrainState
from megatron_dataeff.config import RunConfig
from megatron_dataeff.training.optimizer import materialise_adam_state


@dataclass
class Resumed:
    """What `RunCheckpoints.restore` found: the position to continue from and the checkpoint's metadata."""

    state: TrainState
    meta: dict  # the checkpoint's megatron_dataeff.json (what a Megatron-LM checkpoint gives, for one)
    ckpt: str  # the checkpoint directory
    full: bool = False  # optimizer and position restored (not weights alone)
    rng_restored: bool = False  # the RNG states too (saved at this layout, on this kind of device)


class RunCheckpoints:
    """Saves to --save and restores from --load for one run (collective: every rank calls each method)."""

    def __init__(self, cfg: RunConfig, placement: Placement, log):
        self.cfg, self.placement, self.log = cfg, placement, log  # log: the run's MetricsLogger (its print)
        # --async-save: the queue of background checkpoint writes (megatron-core's or NVRx's: `async_save`), refused
        # by name here, before any model is built, when the installed megatron-core has neither
        self.async_saves = async_save.open_queue() if cfg.checkpoint.async_save else None

    def describe(self) -> str | None:
        """The start-up line of how checkpoints are written, when there is one to say (--async-save's writer)."""
        return async_save.describe(self.async_saves) if self.async_saves is not None else None

    def path_of(self, iteration: int) -> str | None:
        """The checkpoint directory a save at `iteration` publishes (None without --save)."""
        save = self.cfg.checkpoint.save
        return os.path.join(save, checkpoint_name(iteration)) if save else None

    def save(self, iteration: int, module, optimizer, metadata: dict, blocking: bool = True) -> None:
        """Save to --save; with --async-save and not `blocking`, in the background.  A background save still in
        flight is finished first, so that checkpoints are published in order."""
        self.finish(blocking=True)
        state.save(self.cfg.checkpoint.save, iteration, module, optimizer, metadata, self.placement,
                   keep_last=self.cfg.checkpoint.keep_last, async_queue=None if blocking else self.async_saves,
                   print_fn=self.log.print)

    def finish(self, blocking: bool) -> None:
        """Publish the background saves whose writers have finished on every rank (all of them when
        `blocking`).  Collective while one is in flight; every rank has the same queue, so all call it."""
        if self.async_saves is not None and self.async_saves.get_num_unfinalized_calls():
            self.async_saves.maybe_finalize_async_calls(blocking=blocking)

    def abandon(self) -> None:
        """Kill the writers of background saves still unpublished (after a failure): the previous checkpoint
        stays `latest`."""
        if self.async_saves is not None:
            for call in self.async_saves.async_calls:
                call.async_caller.close(abort=True)
            self.async_saves.async_calls.clear()

    def restore(self, module, optimizer, vocab_ids: int, check=None) -> Resumed | None:
        """Load --load into (module, optimizer); None when there is nothing to load yet (the auto-resume idiom
        --save X --load X on its first launch).  `check(ckpt, meta)` runs before a full restore loads anything."""
        ck = self.cfg.checkpoint
        if not ck.load:
            return None
        if (ck.save and os.path.abspath(ck.save) == os.path.abspath(ck.load)
                and latest_marker(ck.load) is None):
            self.log.print(f" --load {ck.load}: no checkpoint there yet; starting from scratch")
            return None
        ckpt = state.checkpoint_to_load(ck.load, ck.checkpoint_fallback, self.log.print)
        if is_megatron_lm_checkpoint(ckpt):
            info = megatron_lm.load_weights(ckpt, module, self.cfg.model, vocab_ids, self.cfg.data.tokenizer_type)
            self.log.print(f" loaded weights of {ckpt} (a Megatron-LM checkpoint of iteration "
                       f"{info['megatron_lm_iteration']}: iteration 0, fresh optimizer, as --finetune)")
            return Resumed(TrainState(), {"iteration": 0, "consumed_samples": 0, **info}, ckpt)
        meta = read_metadata(ckpt)
        check_compatible(ckpt, meta, self.cfg.to_dict()["model"], vocab_ids)
        check_checkpoint_files(ckpt, meta)
        if ck.finetune or meta.get("model_only", False):
            state.load(ckpt, meta, module, None, self.placement)
            self.log.print(f" loaded weights of {ckpt} (model only: iteration 0, fresh optimizer)")
            return Resumed(TrainState(), meta, ckpt)
        if check is not None:
            check(ckpt, meta)
        if self.cfg.parallel.use_distributed_optimizer:
            materialise_adam_state(optimizer)
        rng = state.load(ckpt, meta, module, optimizer, self.placement)
        return Resumed(TrainState.from_metadata(meta), meta, ckpt, full=True, rng_restored=rng)
