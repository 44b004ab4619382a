"""Activation recomputation (megatron-core's) changes memory, not results: with every dropout on, losses
and gradients are bit-identical with and without it."""

import pytest
import torch

from megatron_dataeff.config import ConfigError
from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.models.builder import build_model
from tests.conftest import losses, run_pretrain

VOCAB = 258
DROPOUTS = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--mlp-dropout", "0.2"]
RECOMPUTE = {
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
    "selective": ["--recompute-granularity", "selective"],
    "selective-mlp": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
}


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(["--num-layers", "3", *argv]))
    cfg.validate_layout(1)
    return cfg


def _loss_and_grads(model, x, pos, labels, seed):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model.train()
    model.zero_grad()
    loss = model(x, pos, None, labels=labels)
    loss.float().sum().backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_recompute_is_bit_identical_with_dropout(megatron_cpu, recompute, backend):
    """Loss and every gradient equal bit for bit with and without recomputation (hidden, attention and
    MLP dropout on, so the recomputed forward must replay the same random numbers)."""
    plain = build_model(_cfg("--attention-backend", backend, *DROPOUTS), VOCAB, "cpu")
    recomp = build_model(_cfg("--attention-backend", backend, *DROPOUTS, *RECOMPUTE[recompute]), VOCAB, "cpu")
    assert recomp.config.recompute_granularity == RECOMPUTE[recompute][1]
    recomp.load_state_dict(plain.state_dict())
    x = torch.randint(0, VOCAB, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    loss_a, grads_a = _loss_and_grads(plain, x, pos, x, seed=11)
    loss_b, grads_b = _loss_and_grads(recomp, x, pos, x, seed=11)
    assert torch.equal(loss_a, loss_b)
    for k, g in grads_a.items():
        assert torch.equal(g, grads_b[k]), k
    # the dropouts are live: another seed gives another loss
    loss_c, _ = _loss_and_grads(plain, x, pos, x, seed=12)
    assert not torch.equal(loss_a, loss_c)


def test_recompute_training_curve_is_bit_identical(tmp_path):
    """A token-dropout + MLP-dropout run trains to the same losses, bit for bit, under full recomputation."""
    common = ["--train-iters", "6", "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "1",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64", "--num-layers", "2",
              "--token-dropout-rate", "0.3", "--mlp-dropout", "0.2", "--hidden-dropout", "0.1"]
    a = losses(run_pretrain(common, tmp_path / "plain"))
    b = losses(run_pretrain(common + RECOMPUTE["full-uniform"], tmp_path / "full"))
    assert a == b and len(a) == 6


@pytest.mark.parametrize("argv, message", [
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
    (["--recompute-method", "uniform"], "--recompute-method and --recompute-num-layers need --recompute-granularity full"),
    (["--recompute-modules", "mlp"], "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "9"],
     "--recompute-num-layers 9 exceeds the 3 layers of a pipeline stage"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
     "--recompute-method uniform: --recompute-num-layers 2 does not divide the 3 layers of a pipeline stage"),
])
def test_recompute_flag_errors(argv, message):
    """Recompute flags that do not fit together are refused naming them."""
    with pytest.raises(ConfigError, match=message):
        _cfg(*argv)


def test_layernorm_recompute_needs_transformer_engine(megatron_cpu):
    """megatron-core's norm recomputation needs TE; without it the flag is refused by name, not a NameError."""
    from megatron_dataeff.models.layer_specs import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("transformer-engine is installed")
    cfg = _cfg("--recompute-granularity", "selective", "--recompute-modules", "layernorm")
    with pytest.raises(ConfigError, match="--recompute-modules layernorm needs transformer-engine"):
        build_model(cfg, VOCAB, "cpu")
