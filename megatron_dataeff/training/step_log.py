"""The train log of each --log-interval: the interval's mean loss (and the objective's named parts), lr, grad
norm, tokens/s, ms/step, model TFLOP/s per device (MFU when the peak is known), peak memory and the ETA, as one
console line and one metrics record."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megatron_dataeff.distributed import all_reduce_cpu
from megatron_dataeff.training.metrics import MetricsLogger, format_duration, peak_memory


def format_speed_and_memory(rec: dict) -> str:
    """The speed and memory part of a train line."""
    parts = [f"{rec['tflops_per_device']:.3g} TFLOP/s/device"]
    if "mfu" in rec:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if "mem_allocated_gib" in rec:
        parts.append(f"mem {rec['mem_allocated_gib']:.1f}/{rec['mem_reserved_gib']:.1f} GiB (allocated/reserved)")
    elif "max_rss_gib" in rec:
        parts.append(f"max RSS {rec['max_rss_gib']:.2f} GiB")
    return " | ".join(parts)


class StepLogger:
    """Accumulates each step's loss and parts and, at each log step, writes the interval's line and record.
    `speed_and_memory` reduces over ranks, so every rank calls `emit` at the same steps."""

    def __init__(self, log: MetricsLogger, part_names: tuple[str, ...], *, flops_per_step: float,
                 peak_tflops: float | None, world_size: int, device: str, seq_length: int, train_iters: int):
        self.log, self.part_names = log, part_names
        self.flops_per_step, self.peak_tflops = flops_per_step, peak_tflops
        self.world_size, self.device = world_size, device
        self.seq_length, self.train_iters = seq_length, train_iters

    def start(self, iteration: int) -> None:
        """The run (re)starts at `iteration`: the ETA counts from here."""
        self.run_start, self.start_iteration = time.time(), iteration
        self._reset()

    def _reset(self) -> None:
        self.interval_start, self.interval_tokens, self.interval_steps = time.time(), 0, 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.parts_sum = dict.fromkeys(self.part_names, 0.0)

    def step(self, loss: float, parts: dict[str, float], tokens: int) -> None:
        """One step's global loss and parts (a non-finite, skipped step counts for time, not for the mean)."""
        self.interval_tokens += tokens
        self.interval_steps += 1
        if math.isfinite(loss):
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
            for name, value in parts.items():
                self.parts_sum[name] += value

    def speed_and_memory(self, seconds_per_step: float) -> dict:
        """TFLOP/s per device (model FLOPs), MFU when the peak is known, and peak memory (max over ranks)."""
        out = {"tflops_per_device": self.flops_per_step / max(seconds_per_step, 1e-9) / self.world_size / 1e12}
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_device"] / self.peak_tflops
        mem = peak_memory(self.device)
        reduced = all_reduce_cpu(torch.tensor(list(mem.values()), dtype=torch.float64), self.device,
                                 op=dist.ReduceOp.MAX)
        out.update({k: float(v) for k, v in zip(mem, reduced.tolist())})
        return out

    def emit(self, iteration: int, *, lr: float, grad_norm: float, epoch: float, consumed_samples: int,
             stepped: bool) -> None:
        """Write the interval ending at `iteration` (its record and console line), then start the next."""
        elapsed = time.time() - self.interval_start
        ms = 1000 * elapsed / self.interval_steps
        done = iteration - self.start_iteration
        eta = (time.time() - self.run_start) / max(done, 1) * (self.train_iters - iteration)
        n = self.loss_n
        avg = self.loss_sum / n if n else float("nan")
        parts = {f"loss_{name}": v / n if n else float("nan") for name, v in self.parts_sum.items()}
        seq = self.seq_length
        rec = {"iteration": iteration, "split": "train", "loss": avg, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": self.interval_tokens / max(elapsed, 1e-9),
               "ms_per_step": ms, "epoch": epoch, "consumed_tokens": consumed_samples * seq,
               "consumed_samples": consumed_samples, **parts}
        rec.update(self.speed_and_memory(elapsed / self.interval_steps))
        if not stepped:
            rec["skipped"] = True
        self.log.log(rec)
        self.log.print(
            f" iteration {iteration:7d}/{self.train_iters} | epoch {epoch:7.2f} | "
            f"tokens {consumed_samples * seq:>12,} | loss {avg:.4f} | "
            + "".join(f"{k[5:]} {v:.4f} | " for k, v in parts.items()) + f"lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {ms:.0f} ms/step | "
            f"{format_speed_and_memory(rec)} | ETA {format_duration(eta)}")
        self._reset()
