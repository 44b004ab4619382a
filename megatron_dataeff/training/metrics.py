"""Where logged values go: the console, `metrics.jsonl` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
import time


def format_duration(seconds: float) -> str:
    """1h02m03s style."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def peak_memory(device: str) -> dict[str, float]:
    """This process's peak memory since start, GiB: CUDA allocated / reserved by torch's allocator, or the
    CPU process's max resident set size."""
    if device == "cuda":
        import torch

        return {"mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    import resource

    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # Linux: kB


class MetricsLogger:
    """One JSON object per event in `{log_dir}/metrics.jsonl`, mirrored to TensorBoard."""

    def __init__(self, log_dir: str | None, tensorboard_dir: str | None, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.path = os.path.join(log_dir, "metrics.jsonl")
            self._file = open(self.path, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=tensorboard_dir)
            except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
                print("[metrics] tensorboard is not installed; TensorBoard logging is off", flush=True)

    def log(self, record: dict) -> None:
        """Write one event: must hold `iteration` and `split`."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            split, step = record["split"], record["iteration"]
            for key, value in record.items():
                if key not in ("iteration", "split", "time") and isinstance(value, (int, float)):
                    if math.isfinite(value):
                        self._tb.add_scalar(f"{split}/{key}", value, step)

    def print(self, line: str) -> None:
        """A console line (rank 0)."""
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        """Flush and close."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
