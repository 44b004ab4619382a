"""--attention-backend: the mapping, and sdpa computing what megatron's unfused attention computes
without keeping the [batch, heads, seq, seq] probabilities (real megatron-core GPTModels)."""

import pytest
import torch

from megatron_dataeff.config import ConfigError
from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.models.attention import SDPAttention
from megatron_dataeff.models.attention_backends import resolve_attention_backend
from megatron_dataeff.models.builder import build_model
from tests.conftest import losses, run_pretrain

VOCAB = 258


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(["--num-layers", "2", *argv]))
    cfg.validate_layout(1)
    return cfg


def _pair(*argv):
    """A local-attention model and an sdpa model with the same weights."""
    torch.manual_seed(0)
    local = build_model(_cfg("--attention-backend", "local", *argv), VOCAB, "cpu")
    sdpa = build_model(_cfg("--attention-backend", "sdpa", *argv), VOCAB, "cpu")
    sdpa.load_state_dict(local.state_dict())
    return local, sdpa


@pytest.mark.parametrize("requested, device, te, impl, kernel", [
    ("auto", "cuda", True, "te", "auto"), ("auto", "cuda", False, "sdpa", "auto"), ("auto", "cpu", False, "sdpa", "auto"),
    ("flash", "cuda", True, "te", "flash"), ("flash", "cuda", False, "sdpa", "flash"), ("flash", "cpu", False, "sdpa", "flash"),
    ("fused", "cuda", True, "te", "fused"), ("fused", "cuda", False, "sdpa", "fused"),
    ("unfused", "cuda", True, "te", "unfused"), ("unfused", "cuda", False, "local", "unfused"),
    ("unfused", "cpu", False, "local", "unfused"), ("local", "cuda", True, "local", "unfused"),
    ("sdpa", "cuda", True, "sdpa", "auto"), ("sdpa", "cpu", False, "sdpa", "auto"),
])
def test_backend_mapping(requested, device, te, impl, kernel):
    """Each --attention-backend value resolves as the documented table says, with a reason to print."""
    choice = resolve_attention_backend(requested, device, te)
    assert (choice.impl, choice.kernel) == (impl, kernel)
    assert choice.reason and choice.describe().startswith("attention ")


def test_backend_refusals_name_the_flag():
    """What no CPU kernel can do is refused naming the flags, before a model is built."""
    with pytest.raises(ConfigError, match="--attention-backend fused needs a GPU"):
        resolve_attention_backend("fused", "cpu", False)
    with pytest.raises(ConfigError, match="--attention-backend flash: the CPU flash kernel has no dropout"):
        resolve_attention_backend("flash", "cpu", False, attention_dropout=0.1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--attention-backend", "xformers"])


def test_sdpa_module_is_built(megatron_cpu):
    """The sdpa backend puts SDPAttention in every layer; local keeps megatron's DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    local, sdpa = _pair()
    assert all(isinstance(layer.self_attention.core_attention, SDPAttention) for layer in sdpa.decoder.layers)
    assert all(isinstance(layer.self_attention.core_attention, DotProductAttention) for layer in local.decoder.layers)
    assert sdpa.attention_choice.impl == "sdpa" and local.attention_choice.impl == "local"


@pytest.mark.parametrize("objective", ["ar", "mdm"])
@pytest.mark.parametrize("groups", ["4", "2", "1"], ids=["mha", "gqa", "mqa"])
def test_sdpa_matches_unfused_forward_and_backward(megatron_cpu, objective, groups):
    """Logits, loss and every gradient of sdpa equal megatron's unfused attention to fp32 tolerance
    (causal for AR, bidirectional for mdm; 4 heads over 4, 2 or 1 key/value groups)."""
    local, sdpa = _pair("--objective", objective, "--num-query-groups", groups)
    torch.manual_seed(1)
    x = torch.randint(0, VOCAB, (3, 40))
    labels = torch.randint(0, VOCAB, (3, 40))
    pos = torch.arange(40).unsqueeze(0).expand(3, -1)
    out = {}
    for name, model in (("local", local), ("sdpa", sdpa)):
        model.train()
        model.zero_grad()
        with torch.no_grad():
            logits = model(x, pos, None)
        loss = model(x, pos, None, labels=labels)
        loss.float().mean().backward()
        out[name] = (logits, loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(out["sdpa"][0], out["local"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sdpa"][1], out["local"][1], rtol=1e-5, atol=1e-5)
    for k, g in out["local"][2].items():
        torch.testing.assert_close(out["sdpa"][2][k], g, rtol=1e-4, atol=1e-6, msg=k)


def _saved_shapes(model, x, pos, labels):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, pos, None, labels=labels).sum().backward()
    return shapes


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_sdpa_saves_no_seq_by_seq_tensor(megatron_cpu, objective):
    """Under sdpa nothing of [batch, heads, seq, seq] (or [batch*heads, seq, seq]) is saved for backward;
    under megatron's unfused attention it is (so this check can fail)."""
    local, sdpa = _pair("--objective", objective)
    b, s, heads = 2, 48, 4
    x = torch.randint(0, VOCAB, (b, s))
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)

    def seq_by_seq(shapes):
        return [sh for sh in shapes if len(sh) >= 3 and sh[-1] == s and sh[-2] == s]

    assert seq_by_seq(_saved_shapes(local.train(), x, pos, x))
    saved = _saved_shapes(sdpa.train(), x, pos, x)
    assert not seq_by_seq(saved), seq_by_seq(saved)
    assert not [sh for sh in saved if len(sh) == 4 and sh[:2] == (b, heads) and sh[2] == sh[3] == s]


def test_sdpa_attention_dropout_is_applied_and_reproducible(megatron_cpu):
    """--attention-dropout with sdpa changes the training forward, reproduces under the same seed, and
    is off in evaluation."""
    _, sdpa = _pair("--attention-dropout", "0.5")
    x = torch.randint(0, VOCAB, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    def run(seed):  # the kernel draws inside megatron's model-parallel RNG fork, as unfused attention does
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        return sdpa(x, pos, None)

    sdpa.train()
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    sdpa.eval()
    with torch.no_grad():
        assert torch.equal(sdpa(x, pos, None), sdpa(x, pos, None))


def test_sdpa_bottom_right_causal_for_a_longer_key(megatron_cpu):
    """A causal query shorter than its keys (cached decoding) attends up to its own absolute position."""
    from megatron.core.transformer.enums import AttnMaskType

    cfg = _cfg("--attention-backend", "sdpa")
    from megatron_dataeff.models.builder import transformer_config

    attn = SDPAttention(transformer_config(cfg, "cpu"), 1, AttnMaskType.causal).eval()
    torch.manual_seed(2)
    q, k, v = (torch.randn(10, 1, 4, 32) for _ in range(3))
    full = attn(q, k, v, None)
    tail = attn(q[-3:], k, v, None)  # the last 3 queries against all 10 keys
    torch.testing.assert_close(tail, full[-3:], rtol=1e-6, atol=1e-6)
    one = attn(q[-1:], k, v, None)
    torch.testing.assert_close(one, full[-1:], rtol=1e-6, atol=1e-6)


COMMON = ["--train-iters", "10", "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "2",
          "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64", "--lr", "3e-3",
          "--num-layers", "2"]


@pytest.mark.slow  # the default suite compares sdpa at TP=2 with unfused at TP=1 (test_distributed.py)
def test_sdpa_loss_curve_matches_unfused(tmp_path):
    """Ten AR training steps: the sdpa and unfused loss curves agree to 1e-4 relative (masked diffusion:
    tests/test_distributed.py compares sdpa at TP=2 with unfused at TP=1)."""
    objective = "ar"
    a = losses(run_pretrain(COMMON + ["--objective", objective, "--attention-backend", "local"], tmp_path / "l"))
    b = losses(run_pretrain(COMMON + ["--objective", objective, "--attention-backend", "sdpa"], tmp_path / "s"))
    assert len(a) == len(b) == 10
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= 1e-4 * abs(x), f"step {step}: unfused {x} vs sdpa {y}"
