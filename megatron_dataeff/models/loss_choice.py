"""Which cross entropy computes the loss, and why (torch is not imported: the memory estimate reads it too).

| asked | loss |
|---|---|
| `--cross-entropy-loss-fusion` | megatron-core's fused vocab-parallel cross entropy (native or TE), or with `--cross-entropy-fusion-impl cce` Cut Cross-Entropy's fused linear + cross entropy |
| `--cross-entropy-chunk-size 0` | megatron-core's `vocab_parallel_cross_entropy` |
| `--cross-entropy-chunk-size N` | the chunked loss (`models/cross_entropy.py`), N tokens a chunk |
| nothing (auto) | on a GPU with TP = 1 where Cut Cross-Entropy is installed: it; otherwise megatron-core's loss when one micro-batch's fp32 logits take at most 1/16 of the memory at hand, the chunked loss (chunks of <= 256 MiB in fp32) otherwise |

Why: megatron's loss keeps an fp32 softmax of the logits' size for backward (4 x tokens x vocab / TP bytes
per micro-batch on the last pipeline stage); the chunked loss keeps none but reads the logits once more in
backward to rebuild it (`python benchmarks/bench_loss_memory.py --sizes ...` measures both).  So the chunked
loss is worth its time only where those bytes matter: the paper's model (vocab 151,936, sequence 4096) at
micro-batch 4 needs 9.3 GiB of them, 12% of an 80 GB GPU (chunked); at micro-batch 1, 2.3 GiB (megatron's).
A fused linear + cross entropy (Cut Cross-Entropy) saves both: the logits are computed block by block inside its
kernels and never kept, so neither the [tokens, vocab] logits nor their gradient exist; it needs the whole
vocabulary on one rank (TP = 1) and is refused by name otherwise.
"The memory at hand" is the GPU's total memory, on CPUs the machine's (its cgroup limit when lower) shared
by the processes torchrun starts on it.  Both losses give the same values and gradients (bit for bit on
CPUs: tests/test_cross_entropy.py), so the choice changes speed and memory, never the run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

from megatron_dataeff.config import RunConfig, auto_chunk_tokens
from megatron_dataeff.objectives import objective_class

MEGATRON_LOSS_SHARE = 1 / 16
"""auto takes megatron-core's unchunked loss when one micro-batch's fp32 logits fit in this share of the
memory at hand."""

GiB = 2**30


@dataclass(frozen=True)
class LossChoice:
    """The loss a run computes: megatron-core's (`chunk_tokens` 0, `fused` its fused kernel's implementation
    or None) or the chunked one (`chunk_tokens` tokens a chunk), and why."""

    chunk_tokens: int
    reason: str
    fused: Optional[str] = None  # native / te (megatron-core's fused loss) or cce (fused linear + loss)

    @property
    def chunked(self) -> bool:
        return self.chunk_tokens > 0

    @property
    def linear(self) -> bool:
        """The output layer and the loss fused: no logits are formed."""
        return self.fused == "cce"

    def describe(self) -> str:
        """One phrase for the start-up line."""
        if self.linear:
            name = "fused linear cross entropy (Cut Cross-Entropy, no logits)"
        elif self.fused:
            name = f"megatron fused cross entropy ({self.fused})"
        elif not self.chunked:
            name = "megatron cross entropy (fp32 logits)"
        else:
            name = f"chunked cross entropy ({self.chunk_tokens} tokens/chunk)"
        return f"loss: {name}: {self.reason}"


def logits_fp32_bytes(cfg: RunConfig, vocab_ids: int) -> int:
    """fp32 bytes of one micro-batch's logits on one tensor-parallel rank (the rows the model computes:
    MIR's two rows per sample, block diffusion's [x_t | x_0] rows)."""
    m, objective = cfg.model, objective_class(cfg.objective)
    tokens = (m.seq_length * objective.sequence_multiple(cfg.objective)
              * cfg.optim.micro_batch_size * objective.rows_per_sample(cfg.objective))
    return 4 * tokens * (m.vocab_rows(vocab_ids) // cfg.parallel.tensor_model_parallel_size)


def linear_fusion_installed() -> bool:
    """Whether Cut Cross-Entropy is installed (found, not imported: torch stays unimported here)."""
    try:
        return importlib.util.find_spec("cut_cross_entropy") is not None
    except (ImportError, ValueError):
        return False


def loss_for_config(cfg: RunConfig, vocab_ids: int, capacity_bytes: Optional[int], device: str = "cpu") -> LossChoice:
    """The loss `cfg` asks for on `device` with `capacity_bytes` of memory (None: unknown, auto takes the chunked
    loss unless the fused linear one applies)."""
    c = cfg.compute
    tp = cfg.parallel.tensor_model_parallel_size
    vocab_per_rank = cfg.model.vocab_rows(vocab_ids) // tp
    if c.cross_entropy_loss_fusion:
        return LossChoice(0, f"--cross-entropy-loss-fusion --cross-entropy-fusion-impl {c.cross_entropy_fusion_impl}",
                          fused=c.cross_entropy_fusion_impl)
    if c.cross_entropy_chunk_size == 0:
        return LossChoice(0, "--cross-entropy-chunk-size 0")
    if c.cross_entropy_chunk_size is not None:
        return LossChoice(c.cross_entropy_chunk_size, f"--cross-entropy-chunk-size {c.cross_entropy_chunk_size}")
    if device == "cuda" and tp == 1 and linear_fusion_installed():
        return LossChoice(0, "auto, a GPU, TP 1 and Cut Cross-Entropy installed: the logits never formed", fused="cce")
    chunk = auto_chunk_tokens(vocab_per_rank)
    if capacity_bytes is None:
        return LossChoice(chunk, "auto, the device's memory unknown")
    need = logits_fp32_bytes(cfg, vocab_ids)
    size = f"fp32 logits {need / GiB:.2f} GiB a micro-batch"
    share = f"1/{round(1 / MEGATRON_LOSS_SHARE)} of {capacity_bytes / GiB:.1f} GiB"
    if need <= MEGATRON_LOSS_SHARE * capacity_bytes:
        return LossChoice(0, f"auto, {size} <= {share}")
    return LossChoice(chunk, f"auto, {size} > {share}")

