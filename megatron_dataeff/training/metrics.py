"""Where logged values go: the console, `metrics.jsonl`, TensorBoard and optionally Weights & Biases
(the logging rank only)."""

from __future__ import annotations

import json
import math
import os
import secrets
import time

from megatron_dataeff.atomic import write_text_atomic
from megatron_dataeff.errors import ConfigError


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


WANDB_RUN_ID = "wandb_run_id"  # in --wandb-save-dir: the W&B run a requeued job continues


def check_wandb(project: str | None) -> None:
    """Refuse --wandb-project before any work when wandb is not installed (it is optional)."""
    import importlib.util

    if project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb-project {project}: the wandb package is not installed (pip install wandb, "
                          f"or leave the flag out)")


def _scalars(record: dict):
    """(split/key, value) of the finite numbers of a record."""
    split = record["split"]
    for key, value in record.items():
        if key not in ("iteration", "split", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                yield f"{split}/{key}", value


class WandbWriter:
    """A Weights & Biases run in `save_dir`. Its id is kept in `save_dir/wandb_run_id`, so a job that is
    requeued after a preemption or a time limit (same --run-dir) continues the same W&B run instead of
    starting another. WANDB_MODE=offline (no network) writes the run under `save_dir/wandb/` for a later
    `wandb sync`."""

    def __init__(self, project: str, name: str | None, save_dir: str, config: dict):
        import wandb

        os.makedirs(save_dir, exist_ok=True)
        id_path = os.path.join(save_dir, WANDB_RUN_ID)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(8)  # W&B ids: lower-case letters and digits
            write_text_atomic(id_path, run_id + "\n")
        try:
            self.run = wandb.init(project=project, name=name, dir=save_dir, config=config, id=run_id,
                                  resume="allow")
        except Exception as exc:  # no API key, no network, a bad entity: say so before training starts
            raise ConfigError(f"--wandb-project {project}: wandb.init failed ({exc}); log in with `wandb login` "
                               f"or WANDB_API_KEY, or run offline with WANDB_MODE=offline") from exc
        self.run.define_metric("*", step_metric="iteration")

    def log(self, record: dict) -> None:
        self.run.log({"iteration": record["iteration"], **dict(_scalars(record))})

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class MetricsLogger:
    """One JSON object per event in `{log_dir}/metrics.jsonl`, mirrored to TensorBoard and W&B."""

    def __init__(self, log_dir: str | None, tensorboard_dir: str | None, enabled: bool = True,
                 wandb: dict | None = None):
        """`wandb`: WandbWriter's arguments (project, name, save_dir, config), or None for no W&B."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None:
            self._wandb = WandbWriter(**wandb)
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
            for tag, value in _scalars(record):
                self._tb.add_scalar(tag, value, record["iteration"])
        if self._wandb is not None:
            self._wandb.log(record)

    def print(self, line: str) -> None:
        """A console line (rank 0)."""
        if self.enabled:
            print(line, flush=True)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close (a W&B run is marked failed when exit_code is not 0)."""
        if self._wandb is not None:
            self._wandb.close(exit_code)
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
