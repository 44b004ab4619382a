"""Throughput you can see: model FLOPs by Megatron-LM's formula, MFU against a device peak, peak memory."""

import os
import subprocess
import sys

import pytest

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.training import flops
from tests.conftest import ROOT, run_pretrain


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(list(argv)))
    cfg.validate_layout(1)
    return cfg


def test_flops_per_token_by_hand():
    """h=64, 2 layers, 4 heads of 32 (q=128) over 2 groups (kv=64), ffn 96, seq 16, vocab 256:
    6 x [2 x (64 x 256 + 128 x 64 + 128 x 8 x 2 + 3 x 64 x 96) + 64 x 256] for AR (causal: s/2 = 8)."""
    argv = ["--hidden-size", "64", "--num-layers", "2", "--num-attention-heads", "4", "--kv-channels", "32",
            "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "16"]
    ar = flops.flops_per_token(_cfg(*argv), 256)
    assert ar == 6 * (2 * (64 * 256 + 128 * 64 + 128 * 8 * 2 + 3 * 64 * 96) + 64 * 256)
    mdm = flops.flops_per_token(_cfg(*argv, "--objective", "mdm"), 256)
    assert mdm - ar == 6 * 2 * 128 * 8 * 2  # bidirectional attention counts the whole score matrix
    step = flops.flops_per_step(_cfg(*argv, "--global-batch-size", "8", "--micro-batch-size", "4"), 256)
    assert step == ar * 8 * 16


def test_flops_match_megatron_lm_closed_form():
    """For causal attention our count equals Megatron-LM's 12 B s L h^2 (...) expression with the
    causal score matrix counted half (qwen3-0.6b shape, vocab 151,936)."""
    cfg = _cfg("--model-preset", "qwen3-0.6b")
    m = cfg.model
    h, s, L, V = m.hidden_size, m.seq_length, m.num_layers, 151936
    q_ratio = m.num_attention_heads * m.kv_channels / h
    closed = 12 * s * L * h * h * ((1 + m.num_query_groups / m.num_attention_heads + s / h / 2) * q_ratio
                                  + m.ffn_hidden_size / h * 1.5 + V / (2 * L * h))
    assert flops.flops_per_token(cfg, V) * s == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("name, bf16, peak", [
    ("NVIDIA H200", True, 989.0), ("NVIDIA H100 80GB HBM3", True, 989.0), ("NVIDIA H100 PCIe", True, 756.0),
    ("NVIDIA A100-SXM4-80GB", True, 312.0), ("NVIDIA GeForce RTX 4090", True, None), ("NVIDIA H200", False, None),
    (None, True, None),
])
def test_peak_tflops_from_device_name(name, bf16, peak):
    """The default MFU peak comes from the GPU's name (dense bf16); unknown GPUs, fp32 and CPUs get none."""
    assert flops.peak_tflops(name, bf16) == peak


def test_train_records_carry_tflops_mfu_and_memory(tmp_path):
    """Every train record has TFLOP/s per device from the step time, MFU against --peak-tflops, and the
    peak memory (max RSS on CPUs); the log line prints them."""
    argv = ["--train-iters", "4", "--log-interval", "2", "--eval-interval", "0", "--eval-iters", "0",
            "--micro-batch-size", "2", "--seq-length", "32", "--num-layers", "2", "--peak-tflops", "0.5"]
    recs = [r for r in run_pretrain(argv, tmp_path) if r["split"] == "train"]
    assert len(recs) == 2
    step_flops = flops.flops_per_step(_cfg("--micro-batch-size", "2", "--seq-length", "32", "--num-layers", "2"),
                                      384)
    for r in recs:
        assert r["tflops_per_device"] == pytest.approx(step_flops / (r["ms_per_step"] / 1000) / 1e12, rel=1e-3)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
        assert 0.05 < r["max_rss_gib"] < 64


def test_gpu_only_communication_flags_are_refused_on_cpu():
    """--overlap-grad-reduce on CPUs stops at once with a one-line error naming the flag."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), "--device", "cpu",
                           "--overlap-grad-reduce", "--train-iters", "1"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2
    assert "--overlap-grad-reduce overlaps communication on CUDA streams; it needs GPUs" in proc.stderr
    with pytest.raises(SystemExit):  # and the param gather needs the distributed optimizer
        from megatron_dataeff.arguments import parse_config

        parse_config(["--overlap-param-gather"])
