"""A run's record in --run-dir, written by the logging rank: run.json (what the run is) and status.json (how
its last launch ended, for job scripts that requeue: examples/slurm/pretrain.sbatch)."""

from __future__ import annotations

import json
import os
import time

from megatron_dataeff.atomic import write_text_atomic


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


class RunRecord:
    """run.json and status.json of one run directory (nothing is written when not `enabled`)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled

    def owner_problem(self, cfg) -> str | None:
        """Why this run may not write into the run directory (None: it may): the directory holds another run's
        run.json and this run does not continue that run (its --load or --save is not that run's --save)."""
        path = os.path.join(self.run_dir, "run.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                previous = (json.load(f).get("config") or {}).get("checkpoint") or {}
        except (OSError, ValueError):
            return f"{path} is not a readable run record; give another --run-dir (or remove it)"
        saved = previous.get("save")
        ck = cfg.checkpoint
        if _same_path(saved, ck.load) or _same_path(saved, ck.save):
            return None
        return (f"run directory {self.run_dir} holds another run's record ({path}: --save {saved or 'none'}); this run "
                f"(--save {ck.save or 'none'}, --load {ck.load or 'none'}) would mix its records, TensorBoard and "
                f"status into it: give its own --run-dir (or --log-dir / --save), or --load {saved} to continue "
                f"that run" if saved else
                f"run directory {self.run_dir} holds another run's record ({path}, a run without --save); give this "
                f"run its own --run-dir (or --log-dir / --save)")

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
