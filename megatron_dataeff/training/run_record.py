"""A run's record in --run-dir, written by the logging rank: run.json (what the run is) and status.json (how
its last launch ended, for job scripts that requeue: examples/slurm/pretrain.sbatch)."""

from __future__ import annotations

import json
import os
import time

from megatron_dataeff.atomic import write_text_atomic


class RunRecord:
    """run.json and status.json of one run directory (nothing is written when not `enabled`)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled

    def write_run(self, record: dict) -> None:
        """run.json: the run's facts (as its checkpoints record them) and how it is computed."""
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        write_text_atomic(os.path.join(self.run_dir, "run.json"), json.dumps(record, indent=2))

    def write_status(self, state: str, reason: str, iteration: int, train_iters: int, checkpoint: str | None) -> None:
        """status.json: `state` finished or exited (resumable), why, where, and the checkpoint to resume from."""
        if not self.enabled:
            return
        status = {"state": state, "reason": reason, "iteration": iteration, "train_iters": train_iters,
                  "checkpoint": checkpoint, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(os.path.join(self.run_dir, "status.json"), json.dumps(status, indent=2))
