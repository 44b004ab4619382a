"""The training loop, on megatron-core's machinery.

Each step: every data-parallel rank takes its contiguous slice of the global batch (global sample
indices k*GB + r*GB/dp + ...), split into micro-batches; the objective corrupts each micro-batch
with noise keyed by the global sample index; `get_forward_backward_func` runs the (pipelined)
forward/backward with per-token loss sums; megatron's DDP reduces gradients, `finalize_model_grads`
divides them by the global token count, and the megatron optimizer clips and steps.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_dataeff import platform
from megatron_dataeff.atomic import write_text_atomic
from megatron_dataeff.config import ConfigError, RunConfig
from megatron_dataeff.errors import UserError
from megatron_dataeff.data.blending import build_run_data, parse_data_path, run_data_path
from megatron_dataeff.data.indexed import IndexedFormatError, check_token_ids
from megatron_dataeff.data.tokenizers import build_tokenizer, resolve_mask_token
from megatron_dataeff.models.builder import build_model, count_parameters
from megatron_dataeff.objectives import build_objective
from megatron_dataeff.ops import extension
from megatron_dataeff.ops.corruption import corruption_implementation
from megatron_dataeff.training import checkpointing, flops
from megatron_dataeff.training.exits import ExitConditions
from megatron_dataeff.training.distributed import Runtime, barrier, initialize, world_size_from_env
from megatron_dataeff.training.metrics import MetricsLogger, check_wandb, format_duration, peak_memory
from megatron_dataeff.training.optimizer import build_optimizer, build_scheduler, schedule, scheduler_increment


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf."""


def _all_reduce(t: torch.Tensor, device: str, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce a small CPU tensor over ranks (NCCL needs it on the GPU); returns it on the CPU."""
    if dist.get_world_size() == 1:
        return t
    work = t.to("cuda") if device == "cuda" else t
    dist.all_reduce(work, group=group, op=op)
    return work.cpu()


def check_device_flags(cfg: RunConfig, device: str) -> None:
    """Refuse, by name, what the device cannot do (before any model is built)."""
    p = cfg.parallel
    if device == "cpu":
        for flag, on in (("--overlap-grad-reduce", p.overlap_grad_reduce),
                         ("--overlap-param-gather", p.overlap_param_gather)):
            if on:
                raise ConfigError(f"{flag} overlaps communication on CUDA streams; it needs GPUs (running on CPUs)")


def resolve_data_path(cfg: RunConfig, tokenizer, runtime: Runtime) -> list[str]:
    """`--data-path` items to train on (checked to exist), else the embedded corpus prefix, which rank 0
    tokenizes and caches before the others read it."""
    if not cfg.data.data_path and runtime.rank == 0:
        run_data_path(cfg, tokenizer)
    if not cfg.data.data_path:
        barrier()
    return run_data_path(cfg, tokenizer)


def check_vocabulary(data_path: list[str], vocab_size: int, runtime: Runtime) -> None:
    """Every dataset's token ids fit the tokenizer (before any model is built). Rank 0 reads the `.bin`
    files once and tells every rank, so a job does not read its data set once per process."""
    error = ""
    if runtime.rank == 0:
        prefixes, _ = parse_data_path(list(data_path))
        try:
            for prefix in prefixes:
                check_token_ids(prefix, vocab_size)
        except (IndexedFormatError, OSError) as exc:  # every rank must hear of it, or the others would wait
            error = f"--data-path {exc}"
    if dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ConfigError(error)


def _format_speed_and_memory(rec: dict) -> str:
    parts = [f"{rec['tflops_per_device']:.3g} TFLOP/s/device"]
    if "mfu" in rec:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if "mem_allocated_gib" in rec:
        parts.append(f"mem {rec['mem_allocated_gib']:.1f}/{rec['mem_reserved_gib']:.1f} GiB (allocated/reserved)")
    elif "max_rss_gib" in rec:
        parts.append(f"max RSS {rec['max_rss_gib']:.2f} GiB")
    return " | ".join(parts)


class Trainer:
    """Builds everything a run needs from a RunConfig, then trains."""

    def __init__(self, cfg: RunConfig):
        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self.cfg = cfg
        if cfg.checkpoint.use_checkpoint_args:
            if not cfg.checkpoint.load:
                raise ConfigError("--use-checkpoint-args needs --load")
            ckpt = checkpointing.resolve_checkpoint(cfg.checkpoint.load)
            cfg.adopt_checkpoint_args(checkpointing.read_metadata(ckpt))
        # Layout errors, and flags this device cannot honour, surface before any process group or model exists.
        self.dp_size = cfg.validate_layout(world_size_from_env())
        check_device_flags(cfg, platform.resolve_device(cfg.parallel.device))
        check_wandb(cfg.logging.wandb_project)
        self.runtime = initialize(cfg.parallel.tensor_model_parallel_size,
                                  cfg.parallel.pipeline_model_parallel_size, cfg.optim.seed,
                                  cfg.parallel.device, timeout_minutes=cfg.parallel.distributed_timeout_minutes)
        rt = self.runtime
        lg = cfg.logging
        wandb = None if lg.wandb_project is None else dict(
            project=lg.wandb_project, name=lg.wandb_exp_name or os.path.basename(os.path.normpath(lg.run_dir)),
            save_dir=lg.wandb_save_dir, config=cfg.to_dict())
        self.log = MetricsLogger(lg.log_dir, lg.tensorboard_dir or None, enabled=rt.is_logging_rank, wandb=wandb)
        ck = cfg.checkpoint
        self.async_saves = None  # --async-save: megatron-core's queue of background checkpoint writes
        if ck.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_saves = AsyncCallsQueue()
        self.exits = ExitConditions(ck.exit_signal_handler, ck.exit_signal, ck.exit_duration_in_mins,
                                    ck.exit_interval, self.start_time,
                                    lambda t: _all_reduce(t, rt.device, op=dist.ReduceOp.MAX))
        d = cfg.data
        self.tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, vocab_file=d.vocab_file,
                                         merge_file=d.merge_file, vocab_size=d.vocab_size)
        self.mask_token_id, self.vocab_ids = resolve_mask_token(self.tokenizer)
        data_path = resolve_data_path(cfg, self.tokenizer, rt)
        check_vocabulary(data_path, self.tokenizer.vocab_size, rt)
        self.data = build_run_data(cfg, data_path)
        gbs = cfg.optim.global_batch_size
        if cfg.optim.train_iters is not None:
            self.train_iters = cfg.optim.train_iters
        elif cfg.optim.train_samples is not None:
            self.train_iters = cfg.optim.train_samples // gbs  # Megatron-LM: whole global batches
        elif d.epochs is not None:
            self.train_iters = max(1, math.ceil(d.epochs * self.data.samples_per_epoch / gbs))
        else:
            raise ConfigError("give --train-iters, --train-samples or --epochs")
        self.objective = build_objective(cfg, self.mask_token_id, vocab_ids=self.vocab_ids,
                                         train_iters=self.train_iters)
        self.rows_per_sample = self.objective.rows_per_sample(cfg.objective)  # model rows per training sample
        self.last_parts: dict[str, float] = {}  # the objective's named loss parts of the last step
        self.num_microbatches = cfg.num_microbatches(self.dp_size)
        self._build_model_and_optimizer()
        self.iteration = 0
        self.consumed_samples = 0
        # The latest and the best validation of the run ({"last": record, "best": record}), kept in checkpoints.
        self.validation: dict[str, dict] = {}
        ck = cfg.checkpoint
        if ck.load:
            fresh = (ck.save and os.path.abspath(ck.save) == os.path.abspath(ck.load)
                     and not os.path.exists(os.path.join(ck.load, checkpointing.LATEST)))
            if fresh:  # the auto-resume idiom (--save X --load X) on its first launch
                self.log.print(f" --load {ck.load}: no checkpoint there yet; starting from scratch")
            else:
                state = checkpointing.load(self, ck.load, finetune=ck.finetune)
                self.iteration = state["iteration"]
                self.consumed_samples = state["consumed_samples"]
                if self.iteration:  # a resumed run, not weights to start from
                    self.validation = dict(state.get("validation") or {})
        self._write_run_record()

    # ------------------------------------------------------------------------------------------
    def _build_model_and_optimizer(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        cfg, rt = self.cfg, self.runtime
        model = build_model(cfg, self.vocab_ids, rt.device)
        self.transformer_config = model.config
        p = cfg.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=not p.grad_reduce_in_bf16,
            overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather,
            use_distributed_optimizer=p.use_distributed_optimizer,
            bucket_size=p.ddp_bucket_size,
            check_for_nan_in_grad=False,
        )
        self.attention = model.attention_choice
        self.model = [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)]
        self.optimizer = build_optimizer(cfg, self.model)
        self.schedule = schedule(cfg, self.train_iters)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.train_iters, self.schedule)
        tc = self.transformer_config
        tc.no_sync_func = self.model[0].no_sync
        tc.finalize_model_grads_func = finalize_model_grads
        tc.grad_scale_func = self.optimizer.scale_loss
        n_params = count_parameters(model)
        from megatron.core import parallel_state

        totals = _all_reduce(torch.tensor([n_params], dtype=torch.float64), rt.device,
                             group=parallel_state.get_model_parallel_group())
        self.num_parameters = int(totals.item())
        padded_vocab = cfg.model.vocab_rows(self.vocab_ids)
        self.flops_per_step = flops.flops_per_step(cfg, padded_vocab)
        name = torch.cuda.get_device_name() if rt.device == "cuda" else None
        self.peak_tflops = cfg.logging.peak_tflops or flops.peak_tflops(name, cfg.optim.bf16)

    def _save_checkpoint(self, blocking: bool = True) -> None:
        """Save to --save with the parameters all-gathered (see `_params_synced`); with --async-save and not
        `blocking`, in the background.  A background save still in flight is finished first, so that
        checkpoints are published in order."""
        self._finish_async_saves(blocking=True)
        with self._params_synced():
            checkpointing.save(self, self.cfg.checkpoint.save, None if blocking else self.async_saves)

    def _finish_async_saves(self, blocking: bool) -> None:
        """Publish the background saves whose writers have finished on every rank (all of them when
        `blocking`).  Collective while one is in flight; every rank has the same queue, so all call it."""
        if self.async_saves is not None and self.async_saves.get_num_unfinalized_calls():
            self.async_saves.maybe_finalize_async_calls(blocking=blocking)

    @contextlib.contextmanager
    def _params_synced(self):
        """Parameters all-gathered and the overlap hooks off (evaluation, checkpoints), as Megatron-LM does
        with --overlap-param-gather: the optimizer leaves the gather to the next forward's hooks."""
        overlap = self.cfg.parallel.overlap_param_gather
        if overlap:
            for m in self.model:
                m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if overlap:
                for m in self.model:
                    m.enable_forward_pre_hook()

    def describe_compute(self) -> str:
        """The start-up line of how the model is computed: attention, recomputation, sequence parallelism,
        fusions, loss, gradient communication."""
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
        if c.cross_entropy_loss_fusion:
            loss = f"megatron fused cross entropy ({c.cross_entropy_fusion_impl})"
        elif c.cross_entropy_chunk_size == 0:
            loss = "megatron cross entropy (fp32 logits)"
        else:
            loss = "chunked cross entropy (" + ("auto" if c.cross_entropy_chunk_size is None
                                                 else str(c.cross_entropy_chunk_size)) + " tokens/chunk)"
        comm = [name for name, on in (("overlap grad reduce", p.overlap_grad_reduce),
                                      ("overlap param gather", p.overlap_param_gather),
                                      ("bf16 grad reduce", p.grad_reduce_in_bf16)) if on]
        noise = self.objective.input_noise(self.cfg.objective)
        corruption = (f" | input corruption: {corruption_implementation(self.runtime.device, *noise)}"
                      if noise else "")
        return (f"[megatron_dataeff] {self.attention.describe()} | recompute {recompute} | sequence parallel "
                f"{'on' if p.sequence_parallel else 'off'} | fusions: {', '.join(fused) or 'none'} | loss: {loss}"
                f" | grads: {', '.join(comm) or 'reduce after backward, fp32'}{corruption}")

    def run_facts(self) -> dict:
        """What this run is, recorded in run.json and in every checkpoint's metadata (one source for both):
        the config, the tokenizer and vocabulary, the data budget, the world and its layout, the versions."""
        return {
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.metadata(),
            "mask_token_id": self.mask_token_id,
            "vocab_ids": self.vocab_ids,
            "unique_tokens": self.data.unique_tokens,
            "world_size": self.runtime.world_size,
            "layout": checkpointing.layout_of(self),
            "written_by": checkpointing.checkpoint_versions(),
        }

    def _write_run_record(self):
        import json

        if not self.runtime.is_logging_rank:
            return
        os.makedirs(self.cfg.logging.run_dir, exist_ok=True)
        record = {
            **self.run_facts(),
            "data_prefix": self.data.prefix,
            "train_samples_per_epoch": self.data.samples_per_epoch,
            "train_iters": self.train_iters,
            "num_parameters": self.num_parameters,
            "data_parallel_size": self.dp_size,
            "compute": {"device": self.runtime.device, "attention": self.attention.describe(),
                        "kernels": extension.implementation(self.runtime.device),
                        "flops_per_step": self.flops_per_step, "peak_tflops": self.peak_tflops},
        }
        write_text_atomic(os.path.join(self.cfg.logging.run_dir, "run.json"), json.dumps(record, indent=2))

    def _write_status(self, state: str, reason: str) -> None:
        """run_dir/status.json: how the last launch ended (finished, or exited early and resumable), for job
        scripts that requeue (examples/slurm/pretrain.sbatch)."""
        import json

        if not self.runtime.is_logging_rank:
            return
        ck = self.cfg.checkpoint.save
        status = {"state": state, "reason": reason, "iteration": self.iteration, "train_iters": self.train_iters,
                  "checkpoint": os.path.join(ck, checkpointing.checkpoint_name(self.iteration)) if ck else None,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(os.path.join(self.cfg.logging.run_dir, "status.json"),
                                        json.dumps(status, indent=2))

    # ------------------------------------------------------------------------------------------
    def _microbatches(self, batch_fn, step: int):
        """This rank's micro-batches of global batch `step`."""
        gbs, mbs = self.cfg.optim.global_batch_size, self.cfg.optim.micro_batch_size
        start = step * gbs + self.runtime.dp_rank * (gbs // self.dp_size)
        for m in range(self.num_microbatches):
            yield batch_fn(start + m * mbs, mbs)

    def _forward_step(self, evaluation: bool, objective, data_iterator, model):
        batch = next(data_iterator)
        device = self.runtime.device
        # Corrupt on the device: the fused masking kernel runs there when it is built.
        tokens = batch["tokens"].to(device, non_blocking=True)
        ob = objective.prepare(tokens, batch["sample_index"], evaluation=evaluation)
        input_ids, labels = ob.input_ids, ob.labels
        b, s = input_ids.shape
        position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        output = model(input_ids, position_ids, ob.attention_mask, labels=labels)
        return output, partial(self._loss_func, objective, ob)

    def _loss_func(self, objective, ob, per_token_loss):
        loss_sum, num_tokens = objective.loss(per_token_loss, ob)
        n = torch.tensor(num_tokens, dtype=torch.int, device=loss_sum.device)
        # The schedule divides the reported value in place: report a detached copy.
        reports = {"loss": torch.stack([loss_sum.detach().clone().float(), n.float()])}
        if ob.parts:  # training batches of objectives with named loss parts
            for name, (part_sum, tokens) in objective.loss_parts(per_token_loss, ob).items():
                reports[f"part_{name}"] = torch.stack([part_sum.float(), torch.tensor(float(tokens),
                                                                                      device=part_sum.device)])
        return loss_sum, n, reports

    def _run_batch(self, batch_fn, step: int, forward_only: bool, view: str = ""):
        """Forward(/backward) one global batch; returns the global (loss_sum, tokens), and in training also
        each named loss part's (sum, tokens) after them (the objective's `part_names` order)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fwd_bwd = get_forward_backward_func()
        seq = self.cfg.model.seq_length
        outputs = fwd_bwd(
            forward_step_func=partial(self._forward_step, forward_only, self.objective.view(view)),
            data_iterator=self._microbatches(batch_fn, step),
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=seq,
            # the rows the model sees per micro-batch (pipeline stages exchange tensors of this batch size)
            micro_batch_size=self.cfg.optim.micro_batch_size * (1 if forward_only else self.rows_per_sample),
            decoder_seq_length=seq,
            forward_only=forward_only,
        )
        keys = ["loss"] + ([] if forward_only else [f"part_{name}" for name in self.objective.part_names])
        total = torch.zeros(2 * len(keys), dtype=torch.float64)
        if self.runtime.is_last_stage:
            for out in outputs:
                total += torch.cat([out[k].double().cpu() for k in keys])
        # Every last-stage rank holds its data-parallel shard (repeated on each TP rank): summing
        # over all ranks repeats sum and count alike, so their ratio is the global loss everywhere.
        return _all_reduce(total, self.runtime.device)

    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation loss over --eval-iters fixed batches (AR: clean NLL; mdm: ELBO, fixed noise; dual: both
        views, `loss` the AR NLL, `loss_ar` and `loss_mdm` each)."""
        for m in self.model:
            m.eval()
        t0 = time.time()
        views = self.objective.evaluation_views
        totals = {view: torch.zeros(2, dtype=torch.float64) for view in views}
        with torch.no_grad(), self._params_synced():
            for view in views:
                for k in range(self.cfg.logging.eval_iters):
                    totals[view] += self._run_batch(self.data.valid_batch, k, forward_only=True, view=view)
        for m in self.model:
            m.train()
        elapsed = time.time() - t0
        tokens = len(views) * self.cfg.logging.eval_iters * self.cfg.optim.global_batch_size * self.cfg.model.seq_length
        losses = {view: float(t[0] / t[1]) if t[1] > 0 else float("nan") for view, t in totals.items()}
        out = {"loss": losses[views[0]], "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if len(views) > 1:
            out.update({f"loss_{view}": value for view, value in losses.items()})
        return out

    def train_step(self, step: int) -> tuple[float, float, bool]:
        """One optimizer step on global batch `step`; (loss, grad_norm, stepped)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = self._run_batch(self.data.train_batch, step, forward_only=False)
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
        if ok:
            self.scheduler.step(increment=scheduler_increment(self.schedule, self.cfg.optim.global_batch_size))
        return loss, float(grad_norm) if grad_norm is not None else float("nan"), bool(ok)

    def _speed_and_memory(self, seconds_per_step: float) -> dict:
        """TFLOP/s per device (model FLOPs), MFU when the peak is known, and peak memory (max over ranks)."""
        out = {"tflops_per_device": self.flops_per_step / max(seconds_per_step, 1e-9) / self.runtime.world_size / 1e12}
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_device"] / self.peak_tflops
        mem = peak_memory(self.runtime.device)
        reduced = _all_reduce(torch.tensor(list(mem.values()), dtype=torch.float64), self.runtime.device,
                              op=dist.ReduceOp.MAX)
        out.update({k: float(v) for k, v in zip(mem, reduced.tolist())})
        return out

    def _log_valid(self):
        res = self.evaluate()
        rec = {"iteration": self.iteration, "split": "valid", "tokens_per_s": res["tokens_per_s"],
               "epoch": self.data.epoch_of(self.consumed_samples),
               "consumed_tokens": self.consumed_samples * self.cfg.model.seq_length,
               **{k: v for k, v in res.items() if k.startswith("loss")}}
        self.log.log(rec)
        best = self.validation.get("best")
        self.validation = {"last": rec, "best": rec if best is None or rec["loss"] < best["loss"] else best}
        views = self.objective.evaluation_views
        if len(views) > 1:
            shown = " | ".join(f"val {'ELBO' if self.objective.view(v).monte_carlo else 'AR NLL'} {res[f'loss_{v}']:.4f}"
                               for v in views)
        else:
            shown = f"{'val ELBO' if self.objective.monte_carlo else 'val loss'} {res['loss']:.4f}"
        self.log.print(f" validation | iteration {self.iteration:7d} | {shown} | "
                       f"ppl {math.exp(min(res['loss'], 50)):.2f}")
        return res

    def train(self) -> dict:
        """Train to --train-iters; returns the final train and validation losses."""
        cfg, rt = self.cfg, self.runtime
        gbs, seq = cfg.optim.global_batch_size, cfg.model.seq_length
        self.log.print(
            f"[megatron_dataeff] {self.objective.describe()}"
            f" | {self.num_parameters / 1e6:.2f}M parameters | device {rt.device} | world {rt.world_size} "
            f"(TP {cfg.parallel.tensor_model_parallel_size}, PP {cfg.parallel.pipeline_model_parallel_size}, "
            f"DP {self.dp_size}) | {self.data.unique_tokens:,} unique tokens, "
            f"{self.data.samples_per_epoch:,} samples/epoch | {self.train_iters} iterations of {gbs} x {seq} "
            f"= {self.train_iters * gbs / self.data.samples_per_epoch:.2f} epochs")
        self.log.print(self.describe_compute())
        if rt.device == "cuda":
            from megatron_dataeff.models.layer_specs import transformer_engine_available
            from megatron_dataeff.training.memory import startup_report

            capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            for line in startup_report(cfg, rt.world_size, self.vocab_ids, capacity, transformer_engine_available()):
                self.log.print(line)
        ck = cfg.checkpoint
        if (ck.exit_signal_handler or ck.exit_duration_in_mins or ck.exit_interval) and not ck.save:
            self.log.print("[megatron_dataeff] warning: an --exit-* condition without --save stops the run "
                           "without saving it")
        last = {"train_loss": float("nan"), "valid_loss": float("nan")}
        run_start = time.time()
        start_iteration = self.iteration
        self.exits.install()
        try:
            return self._train_loop(last, run_start, start_iteration)
        finally:
            self.exits.restore()

    def _train_loop(self, last: dict, run_start: float, start_iteration: int) -> dict:
        cfg = self.cfg
        gbs, seq = cfg.optim.global_batch_size, cfg.model.seq_length
        interval_start, interval_tokens, interval_steps = time.time(), 0, 0
        loss_acc, loss_n = 0.0, 0
        parts_acc = dict.fromkeys(self.objective.part_names, 0.0)
        while self.iteration < self.train_iters:
            loss, grad_norm, stepped = self.train_step(self.iteration)
            self.iteration += 1
            self.consumed_samples += gbs
            interval_tokens += gbs * seq
            interval_steps += 1
            if math.isfinite(loss):
                loss_acc, loss_n = loss_acc + loss, loss_n + 1
                for name, value in self.last_parts.items():
                    parts_acc[name] += value
                last["train_loss"] = loss
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == self.train_iters:
                elapsed = time.time() - interval_start
                ms = 1000 * elapsed / interval_steps
                done = self.iteration - start_iteration
                eta = (time.time() - run_start) / max(done, 1) * (self.train_iters - self.iteration)
                lr = self.optimizer.param_groups[0]["lr"]
                epoch = self.data.epoch_of(self.consumed_samples)
                avg = loss_acc / loss_n if loss_n else float("nan")
                parts = {f"loss_{name}": v / loss_n if loss_n else float("nan") for name, v in parts_acc.items()}
                rec = {"iteration": self.iteration, "split": "train", "loss": avg, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": interval_tokens / max(elapsed, 1e-9),
                       "ms_per_step": ms, "epoch": epoch, "consumed_tokens": self.consumed_samples * seq,
                       "consumed_samples": self.consumed_samples, **parts}
                rec.update(self._speed_and_memory(elapsed / interval_steps))
                if not stepped:
                    rec["skipped"] = True
                self.log.log(rec)
                self.log.print(
                    f" iteration {self.iteration:7d}/{self.train_iters} | epoch {epoch:7.2f} | "
                    f"tokens {self.consumed_samples * seq:>12,} | loss {avg:.4f} | "
                    + "".join(f"{k[5:]} {v:.4f} | " for k, v in parts.items()) + f"lr {lr:.3e} | "
                    f"grad norm {grad_norm:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {ms:.0f} ms/step | "
                    f"{_format_speed_and_memory(rec)} | ETA {format_duration(eta)}")
                interval_start, interval_tokens, interval_steps = time.time(), 0, 0
                loss_acc, loss_n = 0.0, 0
                parts_acc = dict.fromkeys(self.objective.part_names, 0.0)
            if (cfg.logging.eval_interval and cfg.logging.eval_iters
                    and self.iteration % cfg.logging.eval_interval == 0 and self.iteration < self.train_iters):
                last["valid_loss"] = self._log_valid()["loss"]
            ck = cfg.checkpoint
            saved = False
            self._finish_async_saves(blocking=False)
            if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0 \
                    and self.iteration < self.train_iters:
                self._save_checkpoint(blocking=not ck.async_save)
                saved = True
            reason = self.exits.check(self.iteration) if self.iteration < self.train_iters else None
            if reason:
                if ck.save and not saved:
                    self._save_checkpoint()
                self._finish_async_saves(blocking=True)
                self.log.print(f"[megatron_dataeff] exiting after iteration {self.iteration}/{self.train_iters}: "
                               f"{reason}; " + (f"resume with --load {ck.save}" if ck.save
                                                else "nothing saved (no --save)"))
                last["exit_reason"] = reason
                self._write_status("exited", reason)
                return last
        if cfg.logging.eval_iters:
            last["valid_loss"] = self._log_valid()["loss"]
        if cfg.checkpoint.save:
            self._save_checkpoint()
        self._write_status("finished", f"--train-iters {self.train_iters} reached")
        self.log.print(f"[megatron_dataeff] done: {self.iteration} iterations in "
                       f"{format_duration(time.time() - run_start)}; final train loss {last['train_loss']:.4f}, "
                       f"validation {last['valid_loss']:.4f}")
        return last

    def close(self, exit_code: int = 0):
        """Flush logs (exit_code not 0: the run failed).  A background save still unpublished after a failure
        is abandoned (its writer killed): the previous checkpoint stays `latest`."""
        if getattr(self, "async_saves", None) is not None:
            for call in self.async_saves.async_calls:
                call.async_caller.close(abort=True)
            self.async_saves.async_calls.clear()
        self.log.close(exit_code)
