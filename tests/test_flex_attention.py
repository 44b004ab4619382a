"""--attention-backend flex: FlexAttention computes what sdpa computes for every mask kind, forward and backward,
without keeping a [seq, seq] tensor for backward (real megatron-core GPTModels on CPU, where the backward is
ours: torch has none for FlexAttention on CPUs)."""

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.config import ConfigError
from megatron_dataeff.models.attention_backends import resolve_attention_backend
from megatron_dataeff.models.builder import build_model
from megatron_dataeff.models.flex_attention import FlexAttention, flex
from megatron_dataeff.objectives import build_objective

VOCAB, EOD, MASK = 258, 256, 257
SEQ = 160  # over one 128-token block: a wholly masked block is skipped, a partial one masked inside


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(["--num-layers", "2", "--seq-length", str(SEQ), *argv]))
    cfg.validate_layout(1)
    return cfg


def _tokens(rows=3, seed=0):
    """Windows of random bytes with EODs at random places (documents of 1 to ~60 tokens)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (rows, SEQ + 1), generator=g)
    tokens[torch.rand(rows, SEQ + 1, generator=g) < 0.04] = EOD
    return tokens


KINDS = {  # mask kind: (objective flags, view, document flags)
    "causal": (["--objective", "ar"], None, []),
    "bidirectional": (["--objective", "mdm"], None, []),
    "document-causal": (["--objective", "ar"], None, ["--reset-attention-mask", "--reset-position-ids"]),
    "document-bidirectional": (["--objective", "mdm"], None, ["--reset-attention-mask", "--eod-mask-loss"]),
    "per-row (dual)": (["--objective", "dual"], "", []),
    "per-row documents (dual)": (["--objective", "dual"], "", ["--reset-attention-mask"]),
}


@pytest.mark.parametrize("groups", ["4", "2"], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_flex_matches_sdpa_forward_and_backward(megatron_cpu, kind, groups):
    """Per-token losses and every gradient of flex equal sdpa's to fp32 tolerance, on each mask kind."""
    flags, view, docs = KINDS[kind]
    models = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        models[backend] = build_model(_cfg(*flags, *docs, "--attention-backend", backend, "--num-query-groups",
                                           groups), VOCAB, "cpu")
    models["flex"].load_state_dict(models["sdpa"].state_dict())
    objective = build_objective(_cfg(*flags, *docs), MASK, vocab_ids=VOCAB, train_iters=10, eod_token_id=EOD)
    batch = objective.prepare(_tokens(), torch.arange(3))
    pos = batch.position_ids if batch.position_ids is not None else torch.arange(SEQ).expand(3, SEQ)
    out = {}
    for backend, model in models.items():
        model.train()
        model.zero_grad()
        loss = model(batch.input_ids, pos, batch.attention_mask, labels=batch.labels)
        (loss * batch.loss_weight).sum().backward()
        out[backend] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], rtol=1e-5, atol=1e-5)
    for k, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["flex"][1][k], g, rtol=1e-4, atol=1e-5, msg=k)


def test_flex_keeps_no_seq_by_seq_tensor(megatron_cpu):
    """Training with flex saves nothing of [.., seq, seq] for backward (document masks included)."""
    cfg = _cfg("--objective", "mdm", "--attention-backend", "flex", "--reset-attention-mask")
    model = build_model(cfg, VOCAB, "cpu")
    objective = build_objective(cfg, MASK, vocab_ids=VOCAB, eod_token_id=EOD)
    batch = objective.prepare(_tokens(), torch.arange(3))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch.input_ids, torch.arange(SEQ).expand(3, SEQ), batch.attention_mask, labels=batch.labels).sum() \
            .backward()
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] == SEQ and s[-2] == SEQ]


def test_cpu_backward_matches_autograd_of_the_math():
    """Our CPU backward of FlexAttention (chunked over queries) equals autograd through the dense softmax, with
    a mask whose rows and blocks are partly empty, and grouped keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    import megatron_dataeff.models.flex_attention as fa

    torch.manual_seed(0)
    b, n, groups, s, d = 2, 4, 2, 200, 8
    q = torch.randn(b, n, s, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, groups, s, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, groups, s, d, dtype=torch.float64, requires_grad=True)
    doc = (torch.rand(b, s) < 0.03).cumsum(-1)

    def keep(bb, hh, qi, ki):
        return (doc[bb, qi] == doc[bb, ki]) & (ki <= qi)

    bm = create_block_mask(keep, b, None, s, s, device="cpu")
    old = fa._CPU_BACKWARD_ELEMENTS
    fa._CPU_BACKWARD_ELEMENTS = b * n * s * 7  # 7 query rows a chunk: chunks cross block edges
    try:
        out = flex(q.float(), k.float(), v.float(), bm, 0.3)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
    finally:
        fa._CPU_BACKWARD_ELEMENTS = old
    dense = keep(torch.arange(b)[:, None, None, None], 0, torch.arange(s)[None, None, :, None],
                 torch.arange(s)[None, None, None, :])
    kk, vv = (t.repeat_interleave(n // groups, 1) for t in (k, v))
    p = torch.softmax((q @ kk.transpose(-1, -2) * 0.3).masked_fill(~dense, float("-inf")), -1)
    ref = p @ vv
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-5)


def test_flex_refuses_what_it_cannot_do():
    """Attention dropout with flex is refused by name, as the flag and as a module argument."""
    with pytest.raises(ConfigError, match="--attention-backend flex has no attention dropout"):
        resolve_attention_backend("flex", "cpu", False, attention_dropout=0.1)
    assert resolve_attention_backend("flex", "cuda", True).impl == "flex"
    with pytest.raises(ValueError, match="no attention dropout"):
        FlexAttention(_cfg("--attention-backend", "flex"), 1, None, attention_dropout=0.1)


def test_training_with_flex_follows_sdpa(tmp_path):
    """A short dual run with packed documents (per-row causality inside document masks, handed to flex as
    block masks built from the rows' document ids) follows the sdpa run's losses (relative 1e-4)."""
    from tests.conftest import losses, run_pretrain

    flags = ["--train-iters", "3", "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "1",
             "--micro-batch-size", "4", "--global-batch-size", "4", "--seq-length", "64", "--num-layers", "2",
             "--objective", "dual", "--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
    sdpa = run_pretrain(flags + ["--attention-backend", "sdpa"], tmp_path / "sdpa")
    flexed = run_pretrain(flags + ["--attention-backend", "flex"], tmp_path / "flex")
    for split in ("train", "valid"):
        for x, y in zip(losses(sdpa, split), losses(flexed, split), strict=True):
            assert abs(x - y) <= 1e-4 * abs(x)
