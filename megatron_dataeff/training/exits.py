"""Early exits that save: a signal from the scheduler, a wall-clock budget, a step count.

`--exit-signal-handler` installs a handler for `--exit-signal` (default SIGTERM and SIGUSR1: what a
preemption and SLURM's `--signal=USR1@T` send) that only records the signal.  At the next step
boundary the ranks agree (a MAX all-reduce: a signal seen by any rank stops all of them), a
checkpoint is written to `--save`, and the process exits 0.  `--exit-duration-in-mins` does the same
once that many minutes have passed since the trainer started (agreed the same way, since clocks
differ), and `--exit-interval N` after every N-th iteration (deterministic: no communication).
"""

from __future__ import annotations

import signal
import time
from typing import Callable, Optional


class ExitConditions:
    """Decides, at a step boundary, whether the run stops early; the reason is a sentence for the log."""

    def __init__(self, exit_signal_handler: bool, exit_signals, exit_duration_in_mins: Optional[float],
                 exit_interval: Optional[int], start_time: float,
                 all_reduce_max: Callable):
        self.signals = [getattr(signal, name) for name in exit_signals] if exit_signal_handler else []
        self.duration_s = None if exit_duration_in_mins is None else 60.0 * exit_duration_in_mins
        self.interval = exit_interval
        self.start_time = start_time
        self._all_reduce_max = all_reduce_max
        self._received: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        """Replace the handlers of the exit signals (the previous ones come back with `restore`)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        # Only record it: the step in flight finishes, then every rank stops at the same boundary.
        if self._received is None:
            self._received = signum

    def check(self, iteration: int) -> Optional[str]:
        """Why the run stops after `iteration`, or None. Collective when a signal handler or a duration is set."""
        if self.signals or self.duration_s is not None:
            import torch

            over = self.duration_s is not None and time.time() - self.start_time >= self.duration_s
            local = torch.tensor([self._received or 0, int(over)], dtype=torch.int64)
            agreed = self._all_reduce_max(local).tolist()
            if agreed[0]:
                return f"received {signal.Signals(agreed[0]).name}"
            if agreed[1]:
                return f"--exit-duration-in-mins {self.duration_s / 60:g} reached"
        if self.interval and iteration % self.interval == 0:
            return f"--exit-interval {self.interval} reached"
        return None
