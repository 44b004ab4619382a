"""The trainer: a run built from its parts, then the training loop.

Parts, one job each: `build` (checks before any work, data, model and optimizer), `forward_backward` (one global
batch through megatron-core's schedule), `validator` (validation and the run's best), `step_log` (the train log
line and record), `saving` (checkpoints through `megatron_dataeff.checkpoint`), `run_record` (run.json,
status.json) and `exits` (signals, time limits).  The loop steps the optimizer and asks each part in turn.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist

from megatron_dataeff import platform
from megatron_dataeff.checkpoint.format import checkpoint_versions, read_metadata, resolve_checkpoint
from megatron_dataeff.checkpoint.state import Placement, TrainState
from megatron_dataeff.config import ConfigError, RunConfig
from megatron_dataeff.data.blending import build_run_data
from megatron_dataeff.data.tokenizers import build_tokenizer, resolve_mask_token
from megatron_dataeff.errors import UserError
from megatron_dataeff.models.attention_backends import attention_for_config
from megatron_dataeff.models.layer_specs import transformer_engine_available
from megatron_dataeff.objectives import build_objective
from megatron_dataeff.ops import extension
from megatron_dataeff.ops.corruption import corruption_implementation
from megatron_dataeff.training import flops
from megatron_dataeff.training.build import (build_model_and_optimizer, check_device_flags, check_vocabulary,
                                             params_synced, resolve_data_path, train_iters_of)
from megatron_dataeff.distributed import all_reduce_cpu, initialize, world_size_from_env
from megatron_dataeff.training.exits import ExitConditions
from megatron_dataeff.training.forward_backward import ForwardBackward
from megatron_dataeff.training.housekeeping import Housekeeping
from megatron_dataeff.training.memory import startup_report
from megatron_dataeff.training.metrics import MetricsLogger, check_wandb, format_duration
from megatron_dataeff.training.optimizer import (build_scheduler, check_schedule, resume_schedule, schedule,
                                                 scheduler_increment)
from megatron_dataeff.training.run_record import RunRecord
from megatron_dataeff.training.saving import RunCheckpoints
from megatron_dataeff.training.step_log import StepLogger
from megatron_dataeff.training.validator import Validator


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf."""


class Trainer:
    """Builds everything a run needs from a RunConfig, then trains."""

    def __init__(self, cfg: RunConfig):
        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self.cfg = cfg
        if cfg.checkpoint.use_checkpoint_args:
            if not cfg.checkpoint.load:
                raise ConfigError("--use-checkpoint-args needs --load")
            cfg.adopt_checkpoint_args(read_metadata(resolve_checkpoint(cfg.checkpoint.load)))
        # Layout errors, and what this device or the objective's attention cannot do, surface before any process
        # group or model exists.
        self.dp_size = cfg.validate_layout(world_size_from_env())
        device = platform.resolve_device(cfg.parallel.device)
        check_device_flags(cfg, device)
        attention_for_config(cfg, device, transformer_engine_available())
        check_wandb(cfg.logging.wandb_project)
        p, lg, ck, d = cfg.parallel, cfg.logging, cfg.checkpoint, cfg.data
        if lg.logging_level is not None:  # Megatron-LM's --logging-level: the root logger's
            logging.getLogger().setLevel(lg.logging_level)
        self.runtime = rt = initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.optim.seed,
                                       p.device, timeout_minutes=p.distributed_timeout_minutes)
        wandb = None if lg.wandb_project is None else dict(
            project=lg.wandb_project, name=lg.wandb_exp_name or os.path.basename(os.path.normpath(lg.run_dir)),
            save_dir=lg.wandb_save_dir, config=cfg.to_dict())
        self.record = RunRecord(lg.run_dir, rt.is_logging_rank)
        # one run, one directory: refused on every rank (the logging rank reads the record) before anything is written
        problem = self.record.owner_problem(cfg) if rt.is_logging_rank else None
        if all_reduce_cpu(torch.tensor([float(problem is not None)]), rt.device, op=dist.ReduceOp.MAX)[0] > 0:
            raise ConfigError(problem or f"run directory {lg.run_dir} holds another run's record (see the logging rank)")
        self.log = MetricsLogger(lg.log_dir, lg.tensorboard_dir or None, enabled=rt.is_logging_rank, wandb=wandb)
        self.placement = Placement((p.pipeline_model_parallel_size, p.tensor_model_parallel_size, self.dp_size),
                                   (rt.pp_rank, rt.tp_rank, rt.dp_rank), rt.device)
        self.checkpoints = RunCheckpoints(cfg, self.placement, self.log)
        self.housekeeping = Housekeeping(cfg.compute, rt.device)
        self.exits = ExitConditions(ck.exit_signal_handler, ck.exit_signal, ck.exit_duration_in_mins,
                                    ck.exit_interval, self.start_time,
                                    lambda t: all_reduce_cpu(t, rt.device, op=dist.ReduceOp.MAX))
        self.tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, vocab_file=d.vocab_file,
                                         merge_file=d.merge_file, vocab_size=d.vocab_size)
        self.mask_token_id, self.vocab_ids = resolve_mask_token(self.tokenizer)
        data_path = resolve_data_path(cfg, self.tokenizer, rt)
        check_vocabulary(data_path, self.tokenizer.vocab_size, rt)
        self.data = build_run_data(cfg, data_path)
        self.train_iters = train_iters_of(cfg, self.data.samples_per_epoch)
        self.objective = build_objective(cfg, self.mask_token_id, vocab_ids=self.vocab_ids,
                                         train_iters=self.train_iters, eod_token_id=self.tokenizer.eod)
        self.last_parts: dict[str, float] = {}  # the objective's named loss parts of the last step
        parts = build_model_and_optimizer(cfg, self.vocab_ids, rt)
        self.model, self.optimizer, self.num_parameters = parts.model, parts.optimizer, parts.num_parameters
        self.transformer_config, self.attention = parts.module.config, parts.module.attention_choice
        self.loss_choice = parts.module.loss_choice
        self.schedule = schedule(cfg, self.train_iters)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.train_iters, self.schedule)
        self.flops_per_step = flops.flops_per_step(cfg, cfg.model.vocab_rows(self.vocab_ids))
        name = torch.cuda.get_device_name() if rt.device == "cuda" else None
        self.peak_tflops = lg.peak_tflops or flops.peak_tflops(name, cfg.optim.bf16)
        o, seq = cfg.optim, cfg.model.seq_length
        self.forward_backward = ForwardBackward(
            self.model, self.objective, rt, global_batch_size=o.global_batch_size, micro_batch_size=o.micro_batch_size,
            dp_size=self.dp_size, seq_length=seq, rows_per_sample=self.objective.rows_per_sample(cfg.objective),
            sequence_multiple=self.objective.sequence_multiple(cfg.objective))
        self.validator = Validator(self.forward_backward, self.data.valid_batch, self.log, eval_iters=lg.eval_iters,
                                   global_batch_size=o.global_batch_size, seq_length=seq, synced=self._params_synced)
        self.step_log = StepLogger(self.log, self.objective.part_names, flops_per_step=self.flops_per_step,
                                   peak_tflops=self.peak_tflops, world_size=rt.world_size, device=rt.device,
                                   seq_length=seq, train_iters=self.train_iters)
        self.state = TrainState()
        resumed = self.checkpoints.restore(
            parts.module, self.optimizer, self.vocab_ids,
            check=lambda ckpt, meta: check_schedule(cfg, self.optimizer, self.schedule, ckpt, meta))
        if resumed is not None and resumed.full:
            self.schedule, self.scheduler = resume_schedule(cfg, self.optimizer, self.train_iters, self.schedule,
                                                            self.scheduler, resumed.ckpt, resumed.meta, self.log.print)
            self.state = resumed.state
            self.log.print(f" loaded checkpoint {resumed.ckpt} (iteration {resumed.meta['iteration']}, epoch "
                           f"{resumed.meta['epoch']:.2f}"
                           f"{'' if resumed.rng_restored else ', saved at another layout or device: RNG reseeded'})")
        self._write_run_record()

    # ------------------------------------------------------------------------------------------
    def _params_synced(self):
        return params_synced(self.model, self.cfg.parallel.overlap_param_gather)

    def _save_checkpoint(self, blocking: bool = True) -> None:
        """Save to --save with the parameters all-gathered; with --async-save and not `blocking`, in the
        background."""
        with self._params_synced():
            self.checkpoints.save(self.state.iteration, self.model[0].module, self.optimizer,
                                  self.checkpoint_metadata(), blocking)

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint's megatron_dataeff.json holds: the run's facts (the ones run.json has too), the
        position in the run and the schedule."""
        s = self.state
        return {**self.run_facts(), "iteration": s.iteration, "consumed_samples": s.consumed_samples,
                "epoch": self.data.epoch_of(s.consumed_samples), "scheduler": self.scheduler.state_dict(),
                "schedule": self.schedule, "validation": s.validation,
                "device": self.runtime.device,  # the RNG states are this device's generators
                "model_only": False}

    def run_facts(self) -> dict:
        """What this run is, recorded in run.json and in every checkpoint's metadata (one source for both):
        the config, the tokenizer and vocabulary, the data budget, the world and its layout, the versions."""
        return {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.metadata(),
                "mask_token_id": self.mask_token_id, "vocab_ids": self.vocab_ids,
                "unique_tokens": self.data.unique_tokens, "world_size": self.runtime.world_size,
                "layout": self.placement.record(), "written_by": checkpoint_versions()}

    def _write_run_record(self) -> None:
        rt = self.runtime
        self.record.write_run({
            **self.run_facts(), "data_prefix": self.data.prefix, "train_samples_per_epoch": self.data.samples_per_epoch,
            "train_iters": self.train_iters, "num_parameters": self.num_parameters, "data_parallel_size": self.dp_size,
            "compute": {"device": rt.device, "attention": self.attention.describe(),
                        "loss": self.loss_choice.describe(),
                        "kernels": extension.implementation(rt.device), "flops_per_step": self.flops_per_step,
                        "peak_tflops": self.peak_tflops}})

    def _write_status(self, state: str, reason: str) -> None:
        self.record.write_status(state, reason, self.state.iteration, self.train_iters,
                                 self.checkpoints.path_of(self.state.iteration))

    def describe_compute(self) -> str:
        """The start-up line of how the model is computed: attention, recomputation, sequence parallelism,
        fusions, loss, gradient communication, input corruption."""
        c, p, tc = self.cfg.compute, self.cfg.parallel, self.transformer_config
        if c.recompute_granularity == "full":
            recompute = f"full ({c.recompute_method}, {c.recompute_num_layers} layer(s))"
        elif c.recompute_granularity == "selective":
            recompute = f"selective ({', '.join(tc.recompute_modules)})"
        else:
            recompute = "off"
        fused = [name for name, on in (("SwiGLU", tc.bias_activation_fusion), ("dropout-add", tc.bias_dropout_fusion),
                                       ("masked softmax", tc.masked_softmax_fusion), ("RoPE", tc.apply_rope_fusion),
                                       ("wgrad accumulation", tc.gradient_accumulation_fusion)) if on]
        comm = [name for name, on in (("overlap grad reduce", p.overlap_grad_reduce),
                                      ("overlap param gather", p.overlap_param_gather),
                                      ("bf16 grad reduce", p.grad_reduce_in_bf16)) if on]
        noise = self.objective.input_noise(self.cfg.objective)
        corruption = (f" | input corruption: {corruption_implementation(self.runtime.device, *noise)}"
                      if noise else "")
        return (f"[megatron_dataeff] {self.attention.describe()} | recompute {recompute} | sequence parallel "
                f"{'on' if p.sequence_parallel else 'off'} | fusions: {', '.join(fused) or 'none'} | "
                f"{self.loss_choice.describe()}"
                f" | grads: {', '.join(comm) or 'reduce after backward, fp32'}{corruption}")

    # ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float, bool]:
        """One optimizer step on global batch `step`; (loss, grad_norm, stepped)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = self.forward_backward.run(self.data.train_batch, step, forward_only=False)
        self.housekeeping.after_forward_backward()
        loss = float(total[0] / total[1])
        self.last_parts = {name: float(total[2 + 2 * i] / total[3 + 2 * i])
                           for i, name in enumerate(self.objective.part_names)}
        if not math.isfinite(loss):
            if not self.cfg.optim.skip_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss is {loss} at iteration {step + 1}; stopping (pass --skip-nonfinite-steps to skip "
                    f"such steps instead)")
            return loss, float("nan"), False
        ok, grad_norm, _ = self.optimizer.step()
        self.housekeeping.after_optimizer_step()
        if ok:
            self.scheduler.step(increment=scheduler_increment(self.schedule, self.cfg.optim.global_batch_size))
        return loss, float(grad_norm) if grad_norm is not None else float("nan"), bool(ok)

    def validate(self) -> float:
        """Validate now, log it, keep the run's last and best; returns the validation loss."""
        s = self.state
        self.housekeeping.before_validation()
        s.validation = self.validator.log_validation(s.iteration, self.data.epoch_of(s.consumed_samples),
                                                     s.consumed_samples * self.cfg.model.seq_length, s.validation)
        self.housekeeping.after_validation()
        return s.validation["last"]["loss"]

    def train(self) -> dict:
        """Train to --train-iters; returns the final train and validation losses."""
        cfg, rt = self.cfg, self.runtime
        gbs, seq = cfg.optim.global_batch_size, cfg.model.seq_length
        docs = self.objective.documents
        self.log.print(
            f"[megatron_dataeff] {self.objective.describe()}"
            + (f" | packed documents: {docs.describe()}" if docs is not None else "") +
            f" | {self.num_parameters / 1e6:.2f}M parameters | device {rt.device} | world {rt.world_size} "
            f"(TP {cfg.parallel.tensor_model_parallel_size}, PP {cfg.parallel.pipeline_model_parallel_size}, "
            f"DP {self.dp_size}) | {self.data.unique_tokens:,} unique tokens, "
            f"{self.data.samples_per_epoch:,} samples/epoch | {self.train_iters} iterations of {gbs} x {seq} "
            f"= {self.train_iters * gbs / self.data.samples_per_epoch:.2f} epochs")
        self.log.print(self.describe_compute())
        if self.checkpoints.describe():
            self.log.print(f"[megatron_dataeff] {self.checkpoints.describe()}")
        if rt.device == "cuda":
            capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            for line in startup_report(cfg, rt.world_size, self.vocab_ids, capacity, transformer_engine_available()):
                self.log.print(line)
        ck = cfg.checkpoint
        if (ck.exit_signal_handler or ck.exit_duration_in_mins or ck.exit_interval) and not ck.save:
            self.log.print("[megatron_dataeff] warning: an --exit-* condition without --save stops the run "
                           "without saving it")
        self.exits.install()
        self.housekeeping.start()
        try:
            return self._train_loop()
        finally:
            self.housekeeping.stop()
            self.exits.restore()

    def _train_loop(self) -> dict:
        cfg, s, lg, ck = self.cfg, self.state, self.cfg.logging, self.cfg.checkpoint
        gbs, seq = cfg.optim.global_batch_size, cfg.model.seq_length
        last = {"train_loss": float("nan"), "valid_loss": float("nan")}
        run_start = time.time()
        self.step_log.start(s.iteration)
        while s.iteration < self.train_iters:
            loss, grad_norm, stepped = self.train_step(s.iteration)
            s.iteration += 1
            s.consumed_samples += gbs
            self.step_log.step(loss, self.last_parts, gbs * seq)
            if math.isfinite(loss):
                last["train_loss"] = loss
            if s.iteration % lg.log_interval == 0 or s.iteration == self.train_iters:
                self.step_log.emit(s.iteration, lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                                   epoch=self.data.epoch_of(s.consumed_samples), consumed_samples=s.consumed_samples,
                                   stepped=stepped)
            self.housekeeping.after_step(s.iteration)
            if lg.eval_interval and lg.eval_iters and s.iteration % lg.eval_interval == 0 \
                    and s.iteration < self.train_iters:
                last["valid_loss"] = self.validate()
            saved = False
            self.checkpoints.finish(blocking=False)
            if ck.save and ck.save_interval and s.iteration % ck.save_interval == 0 and s.iteration < self.train_iters:
                self._save_checkpoint(blocking=not ck.async_save)
                saved = True
            reason = self.exits.check(s.iteration) if s.iteration < self.train_iters else None
            if reason:
                if ck.save and not saved:
                    self._save_checkpoint()
                self.checkpoints.finish(blocking=True)
                self.log.print(f"[megatron_dataeff] exiting after iteration {s.iteration}/{self.train_iters}: "
                               f"{reason}; " + (f"resume with --load {ck.save}" if ck.save
                                                else "nothing saved (no --save)"))
                last["exit_reason"] = reason
                self._write_status("exited", reason)
                return last
        if lg.eval_iters:
            last["valid_loss"] = self.validate()
        if ck.save:
            self._save_checkpoint()
        self._write_status("finished", f"--train-iters {self.train_iters} reached")
        self.log.print(f"[megatron_dataeff] done: {s.iteration} iterations in "
                       f"{format_duration(time.time() - run_start)}; final train loss {last['train_loss']:.4f}, "
                       f"validation {last['valid_loss']:.4f}")
        return last

    def close(self, exit_code: int = 0):
        """Flush logs (exit_code not 0: the run failed).  A background save still unpublished after a failure
        is abandoned (its writer killed): the previous checkpoint stays `latest`."""
        if getattr(self, "checkpoints", None) is not None:
            self.checkpoints.abandon()
        self.log.close(exit_code)
