"""The chunked vocab-parallel loss: megatron-core's values and gradients, without an fp32 copy of the logits."""

import pytest
import torch

from megatron_dataeff.models.cross_entropy import auto_chunk_tokens, chunked_vocab_parallel_cross_entropy


def _megatron(logits, target):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 24, None], ids=["chunk1", "chunk7", "chunk24", "auto"])
def test_chunked_loss_equals_megatrons_bit_for_bit(megatron_cpu, dtype, chunk):
    """Per-token losses and the logits' gradient equal megatron-core's vocab_parallel_cross_entropy
    exactly, for chunk sizes that do and do not divide the 24 tokens, in fp32 and bf16."""
    torch.manual_seed(0)
    s, b, v = 8, 3, 1000
    base = (torch.randn(s, b, v) * 3).to(dtype)
    target = torch.randint(0, v, (s, b))
    grad_out = torch.rand(s, b)
    out = {}
    for name, fn in (("megatron", lambda x: _megatron(x, target)),
                     ("chunked", lambda x: chunked_vocab_parallel_cross_entropy(x, target, chunk))):
        x = base.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward(grad_out)
        out[name] = (loss.detach(), x.grad)
    assert out["chunked"][0].dtype == torch.float32
    assert torch.equal(out["chunked"][0], out["megatron"][0])
    assert out["chunked"][1].dtype == dtype
    assert torch.equal(out["chunked"][1], out["megatron"][1])
    # and it is the cross entropy
    ref = torch.nn.functional.cross_entropy(base.float().reshape(-1, v), target.reshape(-1), reduction="none")
    torch.testing.assert_close(out["chunked"][0].reshape(-1), ref, rtol=1e-5, atol=1e-5)


def test_chunked_loss_keeps_no_fp32_logits(megatron_cpu):
    """With bf16 logits, what the chunked loss saves for backward is the bf16 logits and [tokens]-sized
    vectors; megatron-core's saves an fp32 tensor of the logits' size (so this check can fail)."""
    s, b, v = 16, 2, 4096
    logits = torch.randn(s, b, v, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (s, b))

    def saved(fn):
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append((t.dtype, t.numel())) or t, lambda t: t):
            fn()
        return found

    theirs = saved(lambda: _megatron(logits, target))
    ours = saved(lambda: chunked_vocab_parallel_cross_entropy(logits, target, 5))
    assert (torch.float32, s * b * v) in theirs
    assert not [n for dt, n in ours if dt == torch.float32 and n >= s * b * v]
    assert sum(n * (4 if dt == torch.float32 else 2) for dt, n in ours if n >= s * b * v) == s * b * v * 2


def test_auto_chunk_is_bounded():
    """The automatic chunk keeps one fp32 chunk of the paper's vocabulary under 256 MiB."""
    n = auto_chunk_tokens(151936)
    assert 1 <= n and n * 151936 * 4 <= 256 * 2**20 and (n + 1) * 151936 * 4 > 256 * 2**20


def _cfg(*argv):
    from megatron_dataeff.arguments import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
                                                       "--ffn-hidden-size", "128", "--num-attention-heads", "4",
                                                       "--seq-length", "32", "--micro-batch-size", "2", *argv]))


def test_auto_loss_is_megatrons_where_the_fp32_logits_are_small():
    """auto takes megatron-core's loss when one micro-batch's fp32 logits fit in 1/16 of the memory at hand and the
    chunked loss otherwise (the boundary exactly); asked-for losses are kept whatever the memory; the logits
    counted are the rows the model computes (MIR doubles them) and this TP rank's vocabulary."""
    from megatron_dataeff.models.loss_choice import logits_fp32_bytes, loss_for_config

    cfg = _cfg()
    need = logits_fp32_bytes(cfg, 300)
    assert need == 4 * 32 * 2 * 384  # 300 ids padded to 384 rows
    assert logits_fp32_bytes(_cfg("--token-dropout-rate", "0.3", "--token-dropout-aux-weight", "1"),
                             300) == 2 * need
    assert logits_fp32_bytes(_cfg("--objective", "block", "--block-size", "8"), 300) == 2 * need
    at = loss_for_config(cfg, 300, 16 * need)
    assert (at.chunk_tokens, at.fused) == (0, None) and "<= 1/16" in at.describe()
    over = loss_for_config(cfg, 300, 16 * need - 1)
    assert over.chunk_tokens == auto_chunk_tokens(384) and "> 1/16" in over.describe()
    assert loss_for_config(cfg, 300, None).chunk_tokens == auto_chunk_tokens(384)
    assert loss_for_config(_cfg("--cross-entropy-chunk-size", "0"), 300, 1).chunk_tokens == 0
    assert loss_for_config(_cfg("--cross-entropy-chunk-size", "5"), 300, 10**15).chunk_tokens == 5
    fused = loss_for_config(_cfg("--cross-entropy-loss-fusion", "--bf16"), 300, 1)
    assert (fused.chunk_tokens, fused.fused) == (0, "native")


def test_build_model_computes_the_loss_it_chose(megatron_cpu, monkeypatch):
    """build_model records its choice and the model computes that loss: on this machine's memory a test model takes
    megatron's; with a (pretended) tiny memory the chunked one, whose backward is ours (so this check can fail)."""
    from megatron_dataeff import platform
    from megatron_dataeff.models import builder, cross_entropy

    cfg = _cfg()
    model = builder.build_model(cfg, 300, "cpu")
    assert not model.loss_choice.chunked and model.config.cross_entropy_chunk_size == 0
    calls = []
    real = cross_entropy.chunked_vocab_parallel_cross_entropy
    monkeypatch.setattr(builder, "chunked_vocab_parallel_cross_entropy",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    ids = torch.randint(0, 300, (2, 32))
    pos = torch.arange(32).expand(2, 32)
    model(ids, pos, None, labels=ids)
    assert calls == []
    monkeypatch.setattr(platform, "memory_at_hand", lambda device: 1000)
    small = builder.build_model(cfg, 300, "cpu")
    assert small.loss_choice.chunk_tokens == auto_chunk_tokens(384) == small.config.cross_entropy_chunk_size
    small(ids, pos, None, labels=ids)
    assert calls == [auto_chunk_tokens(384)]


needs_cce = pytest.mark.skipif(
    not __import__("megatron_dataeff.models.cross_entropy", fromlist=["x"]).linear_cross_entropy_available(),
    reason="Cut Cross-Entropy is not installed here (pip install cut-cross-entropy; it needs triton, which the newest "
           "leg's torch brings)")


@needs_cce
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_linear_loss_equals_megatrons_and_forms_no_logits(megatron_cpu, dtype):
    """--cross-entropy-fusion-impl cce (Cut Cross-Entropy; on CPUs its torch.compile'd reference): the same per-token
    losses and gradients as megatron-core's loss on the same weights (fp32 to 1e-5, bf16 to 2e-2), the checkpoint
    keys unchanged, and without labels the model still returns logits (generation).  (On CPUs the reference forms the
    logits; CCE's GPU kernels do not: benchmarks/gpu_check.sh step 7 measures that.)"""
    from megatron_dataeff.models import builder

    flags = ["--bf16"] if dtype == "bf16" else []
    ref = builder.build_model(_cfg(*flags, "--cross-entropy-chunk-size", "0"), 300, "cpu")
    fused = builder.build_model(_cfg(*flags, "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "cce"),
                                300, "cpu")
    assert fused.loss_choice.linear and "Cut Cross-Entropy" in fused.loss_choice.describe()
    fused.load_state_dict(ref.state_dict())
    assert set(fused.state_dict()) == set(ref.state_dict())  # the checkpoint keys are the output layer's own
    ids = torch.randint(0, 300, (3, 32))
    pos = torch.arange(32).expand(3, 32)
    losses, grads = {}, {}
    for name, model in (("ref", ref), ("fused", fused)):
        model.zero_grad()
        loss = model(ids, pos, None, labels=ids)
        loss.float().sum().backward()
        losses[name] = loss.float().detach()
        grads[name] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    assert losses["fused"].shape == (3, 32)
    torch.testing.assert_close(losses["fused"], losses["ref"], **tol)
    assert set(grads["fused"]) == set(grads["ref"])
    for n in grads["ref"]:
        torch.testing.assert_close(grads["fused"][n], grads["ref"][n], **tol, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, pos, None).float(), ref(ids, pos, None).float(), **tol)


def test_fused_linear_loss_is_chosen_on_gpus_and_refused_by_name(monkeypatch):
    """auto takes Cut Cross-Entropy on a GPU with TP = 1 where it is installed (never on CPUs, never under TP);
    asking for it under TP, or where it is not installed, is refused naming the flag and what to do."""
    from megatron_dataeff.config import ConfigError
    from megatron_dataeff.models import builder, loss_choice

    monkeypatch.setattr(loss_choice, "linear_fusion_installed", lambda: True)
    assert loss_choice.loss_for_config(_cfg(), 300, 80 * 2**30, "cuda").linear
    assert not loss_choice.loss_for_config(_cfg(), 300, 80 * 2**30, "cpu").linear
    tp2 = _cfg("--tensor-model-parallel-size", "2")
    assert not loss_choice.loss_for_config(tp2, 300, 80 * 2**30, "cuda").linear
    monkeypatch.setattr(loss_choice, "linear_fusion_installed", lambda: False)
    assert not loss_choice.loss_for_config(_cfg(), 300, 80 * 2**30, "cuda").linear
    asked = _cfg("--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "cce", "--tensor-model-parallel-size", "2")
    with pytest.raises(ConfigError, match="--cross-entropy-fusion-impl cce .* --tensor-model-parallel-size 1"):
        asked.validate_layout(2)
    monkeypatch.setattr(builder, "linear_cross_entropy_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install cut-cross-entropy"):
        builder.build_model(_cfg("--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "cce"), 300, "cpu")
