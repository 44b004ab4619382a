"""One global batch through the model: this rank's micro-batches, the objective's corruption and loss, and
megatron-core's (pipelined) forward/backward schedule.

Every data-parallel rank takes its contiguous slice of the global batch (global sample indices
k*GB + r*GB/dp + ...), split into micro-batches; the objective corrupts each micro-batch with noise keyed by the
global sample index; `get_forward_backward_func` runs the forward(/backward) with per-token loss sums
(Megatron-LM's `forward_step` / `loss_func` contract: loss sum, token count, report dict); megatron's DDP
reduces gradients and `finalize_model_grads` divides them by the global token count.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_dataeff.distributed import Runtime, all_reduce_cpu
from megatron_dataeff.models.packed_sequences import packed_forward, unpack


def _on_device(count, device) -> torch.Tensor:
    """A token count (an int, or a tensor already on the device) as a 0-d tensor on `device`: an int is filled in
    by a kernel, not copied from the host (a host-to-device copy waits for the stream on CUDA)."""
    if isinstance(count, torch.Tensor):
        return count.to(device)
    return torch.full((), count, dtype=torch.int64, device=device)


class ForwardBackward:
    """Runs global batches of `objective` through `model` (megatron's model chunks) on this rank."""

    def __init__(self, model: list, objective, runtime: Runtime, *, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, seq_length: int, rows_per_sample: int, sequence_multiple: int = 1):
        self.model, self.objective, self.runtime = model, objective, runtime
        self.gbs, self.mbs, self.dp_size, self.seq = global_batch_size, micro_batch_size, dp_size, seq_length
        self.rows_per_sample = rows_per_sample
        self.model_seq = seq_length * sequence_multiple  # the rows' length (block diffusion: [x_t | x_0])
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        # FlexAttention takes a row mask as a BlockMask (no [seq, seq] tensor); sdpa and local a dense mask;
        # transformer-engine's packed sequences a stream of documents (models/packed_sequences.py)
        choice = get_attr_wrapped_model(model[0], "attention_choice", allow_none=True)
        self.block_masks = choice is not None and choice.impl == "flex"
        self.packed = choice is not None and choice.packed

    def _microbatches(self, batch_fn, step: int):
        """This rank's micro-batches of global batch `step`."""
        start = step * self.gbs + self.runtime.dp_rank * (self.gbs // self.dp_size)
        for m in range(self.num_microbatches):
            yield batch_fn(start + m * self.mbs, self.mbs)

    def _forward_step(self, evaluation: bool, objective, data_iterator, model):
        batch = next(data_iterator)
        device = self.runtime.device
        # Corrupt on the device: the fused masking kernel runs there when it is built.
        tokens = batch["tokens"].to(device, non_blocking=True)
        ob = objective.prepare(tokens, batch["sample_index"], evaluation=evaluation)
        input_ids, labels = ob.input_ids, ob.labels
        b, s = input_ids.shape
        position_ids = ob.position_ids if ob.position_ids is not None else \
            torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        if self.packed:
            output = packed_forward(model, input_ids, position_ids, ob.row_mask, labels=labels)
            return output, partial(self._loss_func, objective, ob)
        if ob.row_mask is None:
            mask = None
        else:
            mask = ob.row_mask.block_mask() if self.block_masks else ob.attention_mask
        output = model(input_ids, position_ids, mask, labels=labels)
        return output, partial(self._loss_func, objective, ob)

    @staticmethod
    def _loss_func(objective, ob, per_token_loss):
        # a packed forward's losses come from the last stage as one stream: per row again
        per_token_loss = unpack(per_token_loss, *ob.labels.shape)
        loss_sum, num_tokens = objective.loss(per_token_loss, ob)
        n = _on_device(num_tokens, loss_sum.device).to(torch.int)
        # The schedule divides the reported value in place: report a detached copy.
        reports = {"loss": torch.stack([loss_sum.detach().clone().float(), n.float()])}
        if ob.parts:  # training batches of objectives with named loss parts
            for name, (part_sum, tokens) in objective.loss_parts(per_token_loss, ob).items():
                reports[f"part_{name}"] = torch.stack([part_sum.float(), _on_device(tokens, part_sum.device).float()])
        return loss_sum, n, reports

    def run(self, batch_fn, step: int, forward_only: bool, view: str = "") -> torch.Tensor:
        """Forward(/backward) global batch `step` (`batch_fn(start, size)` gives its samples); returns the global
        (loss_sum, tokens), and in training also each named loss part's (sum, tokens) after them (the
        objective's `part_names` order), as float64 on the CPU, the same on every rank."""
        rows = self.mbs * (1 if forward_only else self.rows_per_sample)  # the rows the model sees per micro-batch
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, forward_only, self.objective.view(view)),
            data_iterator=self._microbatches(batch_fn, step),
            model=self.model,
            num_microbatches=self.num_microbatches,
            # the tensors pipeline stages exchange: [seq, rows of a micro-batch, hidden], or packed [rows * seq, 1,
            # hidden]
            seq_length=self.model_seq * (rows if self.packed else 1),
            micro_batch_size=1 if self.packed else rows,
            decoder_seq_length=self.model_seq * (rows if self.packed else 1),
            forward_only=forward_only,
        )
        keys = ["loss"] + ([] if forward_only else [f"part_{name}" for name in self.objective.part_names])
        # The micro-batches' reports add up on the device; the host reads them once a step (a copy per
        # micro-batch would wait for the stream each time, between micro-batches of the pipeline).
        total = torch.zeros(2 * len(keys), dtype=torch.float64, device=self.runtime.device)
        if self.runtime.is_last_stage:
            for out in outputs:
                total += torch.cat([out[k].double() for k in keys])
        # Every last-stage rank holds its data-parallel shard (repeated on each TP rank): summing
        # over all ranks repeats sum and count alike, so their ratio is the global loss everywhere.
        return all_reduce_cpu(total, self.runtime.device)
