"""What a GPU run is configured with, checked on a CPU machine (no CUDA is touched)."""

import pytest

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.models.builder import gpu_fusions, transformer_config
from megatron_dataeff.models.layer_specs import transformer_engine_available


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(list(argv)))
    cfg.validate_layout(2)
    return cfg


@pytest.fixture(autouse=True)
def _no_te():
    if transformer_engine_available():
        pytest.skip("these expectations are for a machine without transformer-engine")


def test_gpu_fusions_without_te():
    """Without apex/TE the fusions megatron-core can do (SwiGLU and dropout-add through its torch.compile
    fuser) are on by default on GPUs; those needing TE or compiled kernels stay off; --no-*-fusion wins."""
    f = gpu_fusions(_cfg(), use_te=False)
    assert f["bias_activation_fusion"] and f["bias_dropout_fusion"]
    assert not (f["apply_rope_fusion"] or f["gradient_accumulation_fusion"] or f["masked_softmax_fusion"])
    assert gpu_fusions(_cfg(), use_te=True)["apply_rope_fusion"]
    off = gpu_fusions(_cfg("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"), use_te=False)
    assert not (off["bias_activation_fusion"] or off["bias_dropout_fusion"])


def test_gpu_and_cpu_transformer_configs():
    """A GPU config carries the fusions, recomputation and sequence parallelism asked for; a CPU one has
    every fusion off (no CUDA kernels), the rest unchanged."""
    from megatron.core.transformer.enums import AttnBackend

    cfg = _cfg("--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "selective",
               "--recompute-modules", "core_attn", "mlp", "--bf16")
    gpu, cpu = transformer_config(cfg, "cuda"), transformer_config(cfg, "cpu")
    for tc in (gpu, cpu):
        assert tc.sequence_parallel and tc.recompute_granularity == "selective"
        assert tc.recompute_modules == ["core_attn", "mlp"] and tc.attention_backend == AttnBackend.local
    assert gpu.bias_activation_fusion and gpu.bias_dropout_fusion
    assert not (cpu.bias_activation_fusion or cpu.bias_dropout_fusion or cpu.masked_softmax_fusion)


def test_sequence_parallel_is_off_at_tp1_and_needs_divisible_sequence():
    """--sequence-parallel at TP=1 is turned off (as Megatron-LM does); at TP=2 the sequence must split."""
    cfg = config_from_args(build_parser().parse_args(["--sequence-parallel"]))
    cfg.validate_layout(1)
    assert not cfg.parallel.sequence_parallel
    from megatron_dataeff.config import ConfigError

    cfg = config_from_args(build_parser().parse_args(["--sequence-parallel", "--tensor-model-parallel-size", "2",
                                                      "--seq-length", "63"]))
    with pytest.raises(ConfigError, match="--sequence-parallel: --tensor-model-parallel-size 2 does not divide "
                                          "--seq-length 63"):
        cfg.validate_layout(2)


def test_megatron_fused_cross_entropy_needs_bf16():
    """megatron-core's fused cross entropy returns bf16 gradients; asking for it in fp32 is refused."""
    from megatron_dataeff.config import ConfigError

    with pytest.raises(ConfigError, match="--cross-entropy-loss-fusion.*use it with --bf16"):
        _cfg("--cross-entropy-loss-fusion")
    assert _cfg("--cross-entropy-loss-fusion", "--bf16").compute.cross_entropy_loss_fusion
