"""Megatron-LM's memory housekeeping around the training loop, at the points its training.py uses them.

* `--manual-gc`: Python's automatic garbage collector is off during training (so that no rank pauses for a
  collection at a moment of its own while the others wait in a collective); a full collection runs at the
  start, every `--manual-gc-interval` steps, and before each validation (the young generation after it)
  unless `--no-manual-gc-eval`.  The collector's previous state is restored when training ends.
* `--empty-unused-memory-level`: `torch.cuda.empty_cache()` after each step's forward-backward and after
  validation (1), and also after each optimizer step (2).  Megatron-LM empties after each validation batch;
  here validation is one call, so after it.  Nothing to do on CPUs.
"""

from __future__ import annotations

import gc

import torch

from megatron_dataeff.config import ComputeConfig


class Housekeeping:
    """The gc and cached-memory calls of one run; every method is a no-op when its flag is off."""

    def __init__(self, compute: ComputeConfig, device: str):
        self.empty_level = compute.empty_unused_memory_level if device == "cuda" else 0
        self.manual_gc = compute.manual_gc
        self.gc_interval = compute.manual_gc_interval
        self.gc_eval = compute.manual_gc_eval
        self._gc_was_enabled: bool | None = None

    def start(self) -> None:
        """Before the first step."""
        if self.manual_gc:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def stop(self) -> None:
        """When training ends (normally or not): the collector as it was."""
        if self._gc_was_enabled:
            gc.enable()
        self._gc_was_enabled = None

    def after_forward_backward(self) -> None:
        if self.empty_level >= 1:
            torch.cuda.empty_cache()

    def after_optimizer_step(self) -> None:
        if self.empty_level >= 2:
            torch.cuda.empty_cache()

    def after_step(self, iteration: int) -> None:
        """After step `iteration` (counted from 1) is done and logged."""
        if self.manual_gc and self.gc_interval and iteration % self.gc_interval == 0:
            gc.collect()

    def before_validation(self) -> None:
        if self.manual_gc and self.gc_eval:
            gc.collect()

    def after_validation(self) -> None:
        if self.manual_gc and self.gc_eval:
            gc.collect(generation=0)  # what validation itself left
        if self.empty_level >= 1:
            torch.cuda.empty_cache()
