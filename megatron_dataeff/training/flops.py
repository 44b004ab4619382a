"""Model FLOPs of a training step (Megatron-LM's formula) and the peak a device can do, for TFLOP/s and MFU.

Megatron-LM's `num_floating_point_operations` for a dense GPT with grouped-query attention and
SwiGLU, per token: 3 (forward, weight-gradient and data-gradient GEMMs) x 2 (multiply-add) x

    layers x [ hidden (q + k + v) + q hidden          # QKV and output projections
               + q seq / 2 x 2                         # QK^T and PV; causal attention counts half
               + 3 hidden ffn ]                        # SwiGLU: up, gate, down
    + hidden x padded_vocab                            # logits

with q = heads x kv_channels and k = v = query_groups x kv_channels: every weight of the layers and of
the output layer once (`models/shape.ModelShape`'s parameter counts), plus the two attention products,
which hold no weights.  Causal attention counts half of the score matrix, as Megatron-LM does; masked
diffusion attends both ways, so for it the core-attention term counts in full.  These are model FLOPs:
recomputed forwards are not counted (MFU, not HFU).
"""

from __future__ import annotations

from megatron_dataeff.config import RunConfig
from megatron_dataeff.models.shape import ModelShape
from megatron_dataeff.objectives import objective_class

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
# The first entry whose every word occurs in the name wins, so the specific variants come first.
PEAK_BF16_TFLOPS = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H200", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM
    (("H200",), 989.0),  # SXM
    (("GH200",), 989.0),
    (("H800",), 989.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
)


def flops_per_token(cfg: RunConfig, padded_vocab: int) -> float:
    """Model FLOPs (forward + backward) per trained token."""
    m = cfg.model
    shape = ModelShape.from_model_config(m, padded_vocab)
    attention_span = objective_class(cfg.objective).attention_span(cfg.objective, m.seq_length)
    per_layer = shape.layer_matrix_parameters + shape.q_rows * attention_span * 2
    return 3 * 2 * (shape.num_layers * per_layer + shape.embedding_parameters)


def flops_per_step(cfg: RunConfig, padded_vocab: int) -> float:
    """Model FLOPs of one optimizer step (global batch x sequence length tokens, each sample in as many model
    rows as its objective trains it in: MIR runs every sample twice, clean and corrupted; and each row as long as
    its objective makes it: block diffusion's rows are twice the window)."""
    cls = objective_class(cfg.objective)
    rows = cls.rows_per_sample(cfg.objective) * cls.sequence_multiple(cfg.objective)
    return flops_per_token(cfg, padded_vocab) * cfg.optim.global_batch_size * cfg.model.seq_length * rows


def peak_tflops(device_name: str | None, bf16: bool) -> float | None:
    """The dense bf16 peak of a GPU by name; None when unknown, for fp32 training (whose peak is another
    figure) and on CPUs.  `--peak-tflops` overrides it."""
    if not device_name or not bf16:
        return None
    for words, peak in PEAK_BF16_TFLOPS:
        if all(w in device_name for w in words):
            return peak
    return None
