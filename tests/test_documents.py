"""Packed documents: Megatron-LM's --reset-position-ids, --reset-attention-mask and --eod-mask-loss on every
objective and attention backend (real megatron-core GPTModels on CPU)."""

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.config import ConfigError
from megatron_dataeff.models.attention_backends import attention_for_config
from megatron_dataeff.models.builder import build_model
from megatron_dataeff.models.packed_sequences import packed_forward, packed_seq_params
from megatron_dataeff.objectives import build_objective
from megatron_dataeff.objectives.documents import DocumentFlags, document_ids
from megatron_dataeff.objectives.row_masks import RowMask
from tests.conftest import losses, run_pretrain
from tests.packed_sdpa_pretrain import PACKED_SDPA

VOCAB, EOD, MASK = 258, 256, 257  # the byte tokenizer's ids
DOC_FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(["--num-layers", "2", "--seq-length", "48", *argv]))
    cfg.validate_layout(1)
    return cfg


def _megatron_reference(data: torch.Tensor, reset_position_ids: bool, reset_attention_mask: bool,
                        eod_mask_loss: bool):
    """Megatron-LM's get_ltor_masks_and_position_ids for one row `data` [s] (the AR input tokens), transcribed
    loop for loop: (attention mask [s, s] True = masked out, loss mask [s], position ids [s])."""
    s = data.numel()
    attention_mask = torch.tril(torch.ones((s, s)))
    loss_mask = torch.ones(s)
    if eod_mask_loss:
        loss_mask[data == EOD] = 0.0
    position_ids = torch.arange(s)
    if reset_position_ids or reset_attention_mask:
        eod_index = position_ids[data == EOD].clone()
        prev_index = 0
        for j in range(eod_index.numel()):
            i = int(eod_index[j])
            if reset_attention_mask:
                attention_mask[(i + 1):, :(i + 1)] = 0
            if reset_position_ids:
                position_ids[(i + 1):] -= i + 1 - prev_index
                prev_index = i + 1
    return attention_mask < 0.5, loss_mask, position_ids


@pytest.mark.parametrize("row", [
    [5, 6, EOD, 7, 8, 9, EOD, 1], [EOD, 1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, EOD],
    [1, EOD, EOD, 2, 3, EOD, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8]], ids=["two", "first", "last", "consecutive", "none"])
def test_flags_mean_what_megatron_lm_computes(row):
    """Positions, the causal document mask and the loss mask are Megatron-LM's (get_ltor_masks_and_position_ids)
    for EODs anywhere: first, last, consecutive, none."""
    x = torch.tensor([row])
    flags = DocumentFlags(EOD, True, True, True)
    want_mask, want_loss, want_pos = _megatron_reference(x[0], True, True, True)
    assert torch.equal(flags.row_mask(x, causal=True).dense()[0, 0], want_mask)
    assert torch.equal(flags.loss_keep(x)[0], want_loss)
    assert torch.equal(flags.positions(x)[0], want_pos)
    # both ways inside each document for diffusion rows: the causal mask is the bidirectional one's lower half
    both = flags.row_mask(x, causal=False).dense()[0, 0]
    assert torch.equal(both | torch.ones_like(both).triu(1), want_mask)
    assert torch.equal(both, both.T)


def test_per_row_causality():
    """A [rows] bool picks causal rows (the dual objective's AR rows) inside the document mask."""
    x = torch.tensor([[1, 2, EOD, 3], [1, 2, EOD, 3]])
    mask = RowMask(torch.tensor([True, False]), document_ids(x, EOD)).dense()
    assert torch.equal(mask[0], RowMask(True, document_ids(x[:1], EOD)).dense()[0])
    assert torch.equal(mask[1], RowMask(False, document_ids(x[1:], EOD)).dense()[0])


def _windows(seed=0):
    """Two windows of 49 tokens: [A | B | C] and [B | D], A and B documents ending in EOD; (tokens, B's start in
    the first window, B's length)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g)  # noqa: E731
    a = torch.cat([rand(22), torch.tensor([EOD])])
    b = torch.cat([rand(19), torch.tensor([EOD])])
    first = torch.cat([a, b, rand(6)])
    second = torch.cat([b, rand(29)])
    return torch.stack([first, second]), a.numel(), b.numel()


VIEWS = {"ar": ("ar", None), "mdm": ("mdm", None), "dual-ar": ("dual", "ar"), "dual-mdm": ("dual", "mdm")}


@pytest.mark.parametrize("backend", ["sdpa", "local", "flex"])
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("reset_positions", [True, False], ids=["positions-reset", "positions-run-on"])
def test_a_document_sees_only_itself(megatron_cpu, backend, view, reset_positions):
    """With --reset-attention-mask, document B packed after A gets the per-token losses B gets at the start of
    its own window (same noise), and the gradient of B's loss with respect to A's input embeddings is exactly
    zero: for AR, masked diffusion and both views of the dual model, on sdpa, FlexAttention and megatron's local
    attention,
    with positions reset or not (RoPE is relative, so inside a document both give the same scores)."""
    objective_name, view_name = VIEWS[view]
    flags = ["--reset-attention-mask", "--eod-mask-loss"] + (["--reset-position-ids"] if reset_positions else [])
    cfg = _cfg("--objective", objective_name, "--attention-backend", backend, *flags)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, "cpu")
    model.eval()
    objective = build_objective(cfg, MASK, vocab_ids=VOCAB, eod_token_id=EOD)
    if view_name is not None:
        objective = objective.view(view_name)
    tokens, start, length = _windows()
    batch = objective.prepare(tokens, torch.tensor([3, 4]), evaluation=True)
    diffusion = objective.monte_carlo
    if diffusion:  # the same noise on B in both windows: B's masked tokens of the first window
        batch.input_ids[1, :length] = batch.input_ids[0, start:start + length]
        assert bool(batch.mask[0, start:start + length].any())
    # B's positions that predict one of B's tokens: AR predicts the next one (B's EOD predicts past B)
    span = length if diffusion else length - 1
    embedded = {}

    def keep(module, args, out):
        out.retain_grad()
        embedded["out"] = out

    handle = model.embedding.register_forward_hook(keep)
    pos = batch.position_ids if batch.position_ids is not None else torch.arange(48).expand(2, 48)
    per_token = model(batch.input_ids, pos, batch.attention_mask, labels=batch.labels)
    handle.remove()
    packed, alone = per_token[0, start:start + span], per_token[1, :span]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    packed.sum().backward()
    grad = embedded["out"].grad  # [s, b, h]
    assert torch.count_nonzero(grad[:start, 0]) == 0  # A
    assert torch.count_nonzero(grad[start + length:, 0]) == 0  # C, after B's EOD
    assert torch.count_nonzero(grad[start:start + length, 0]) > 0
    # without the flags A's tokens reach B
    plain = build_objective(_cfg("--objective", objective_name, "--attention-backend", backend), MASK,
                            vocab_ids=VOCAB, eod_token_id=EOD)
    plain = plain.view(view_name) if view_name else plain
    ob = plain.prepare(tokens, torch.tensor([3, 4]), evaluation=True)
    ob.input_ids = batch.input_ids
    leaked = model(ob.input_ids, torch.arange(48).expand(2, 48), ob.attention_mask, labels=ob.labels)
    assert not torch.allclose(leaked[0, start:start + span], alone, rtol=1e-3, atol=1e-3)


OBJECTIVE_FLAGS = {
    "ar": ["--objective", "ar"],
    "token_dropout": ["--objective", "ar", "--token-dropout-rate", "0.5", "--token-dropout-noise", "mixed",
                      "--token-dropout-span", "3"],
    "mir": ["--objective", "ar", "--token-dropout-rate", "0.3", "--token-dropout-aux-weight", "0.5"],
    "mdm": ["--objective", "mdm"],
    "dual": ["--objective", "dual", "--ar-fraction", "0.5"],
}


@pytest.mark.parametrize("name", list(OBJECTIVE_FLAGS))
def test_eod_positions_carry_no_loss(name):
    """--eod-mask-loss: every objective weighs positions whose clean input is EOD 0 and leaves them out of the
    normaliser (MIR: of the clean rows it is normalised by; dual: of each part), and its attention masks and
    positions cover all of its rows."""
    cfg = _cfg(*OBJECTIVE_FLAGS[name], *DOC_FLAGS)
    objective = build_objective(cfg, MASK, vocab_ids=VOCAB, train_iters=10, eod_token_id=EOD)
    tokens = torch.stack([_windows(seed)[0][0] for seed in range(4)])
    eod = tokens[:, :-1] == EOD
    batch = objective.prepare(tokens, torch.arange(4))
    rows = batch.input_ids.shape[0] // 4
    assert batch.loss_weight.shape == (4 * rows, 48)
    assert torch.all(batch.loss_weight[eod.repeat(rows, 1)] == 0)
    assert int(batch.num_tokens) == int((~eod).sum())
    assert batch.attention_mask.shape == (4 * rows, 1, 48, 48)
    assert batch.position_ids.shape == (4 * rows, 48)
    if batch.parts:
        counts = [int(tokens) for _, tokens in batch.parts.values()]
        if name == "mir":
            assert counts == [int((~eod).sum())] * 2
        else:  # dual: AR rows + diffusion rows
            assert sum(counts) == int((~eod).sum()) and min(counts) > 0
    without = build_objective(_cfg(*OBJECTIVE_FLAGS[name]), MASK, vocab_ids=VOCAB, train_iters=10, eod_token_id=EOD)
    plain = without.prepare(tokens, torch.arange(4))
    assert torch.equal(plain.input_ids, batch.input_ids)  # the flags never change the draws
    assert int(plain.num_tokens) == tokens[:, :-1].numel() and plain.position_ids is None


def test_flags_need_an_attention_that_takes_masks():
    """--reset-attention-mask: auto means transformer-engine's packed sequences on a GPU with transformer-engine
    in bf16 (one causality for all rows), FlexAttention on a GPU without it or with a causality per row, sdpa on a CPU,
    and says why; local takes it; transformer-engine's kernels are refused by name where they cannot apply."""
    cfg = _cfg("--reset-attention-mask", "--bf16")
    choice = attention_for_config(cfg, "cuda", True)
    assert (choice.impl, choice.packed) == ("te", True) and "--reset-attention-mask" in choice.reason
    assert "packed sequences (THD)" in choice.describe()
    assert attention_for_config(_cfg("--reset-attention-mask", "--bf16", "--objective", "mdm", "--attention-backend",
                                     "fused"), "cuda", True).packed
    assert attention_for_config(_cfg("--reset-attention-mask"), "cuda", True).impl == "flex"  # fp32: no TE THD
    with pytest.raises(ConfigError, match="without --bf16"):
        attention_for_config(_cfg("--reset-attention-mask", "--attention-backend", "flash"), "cuda", True)
    choice = attention_for_config(cfg, "cuda", False)
    assert choice.impl == "flex" and not choice.packed and "--reset-attention-mask" in choice.reason
    dual = _cfg("--reset-attention-mask", "--bf16", "--objective", "dual")
    assert attention_for_config(dual, "cuda", True).impl == "flex"
    assert attention_for_config(cfg, "cpu", False).impl == "sdpa"
    cfg = _cfg("--reset-attention-mask", "--attention-backend", "flash")
    with pytest.raises(ConfigError, match="--reset-attention-mask.*--attention-backend flash.*packed sequences.*"
                                          "transformer-engine on a GPU in bf16 \\(on CPUs\\)"):
        attention_for_config(cfg, "cpu", False)
    with pytest.raises(ConfigError, match="transformer-engine is not importable"):
        attention_for_config(cfg, "cuda", False)
    with pytest.raises(ConfigError, match="--objective dual.*--attention-backend flash does not take"):
        attention_for_config(_cfg("--reset-attention-mask", "--bf16", "--objective", "dual", "--attention-backend",
                                  "flash"), "cuda", True)
    assert attention_for_config(_cfg("--reset-attention-mask", "--attention-backend", "local"), "cpu", False).impl \
        == "local"


# What transformer-engine's packed sequences do, on a CPU: our sdpa attention takes the `thd` layout (a mask built
# from cu_seqlens), so everything around the kernel (packing the rows, cu_seqlens, rotary positions per sequence,
# the losses per row again, the trainer's schedule) runs here as on a GPU (PACKED_SDPA, tests/packed_sdpa_pretrain.py).


def test_packed_sequences_cut_at_rows_and_documents():
    """cu_seqlens over the rows laid end to end: a sequence starts at every row start and after every EOD; masks
    with a causality per row or blocks are not packed."""
    x = torch.tensor([[1, 2, EOD, 3, 4, EOD], [5, 6, 7, 8, 9, 1], [EOD, EOD, 1, 2, 3, 4]])
    params = packed_seq_params(DocumentFlags(EOD, reset_attention_mask=True).row_mask(x, causal=True))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 6, 12, 13, 14, 18] and params.max_seqlen_q == 6
    assert torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q)
    with pytest.raises(ValueError, match="one causality for every row"):
        packed_seq_params(RowMask(torch.tensor([True, False, True]), document_ids(x, EOD)))


@pytest.mark.parametrize("objective_flags", [["--objective", "ar"], ["--objective", "mdm"],
                                             ["--objective", "ar", "--token-dropout-rate", "0.3",
                                              "--token-dropout-aux-weight", "0.5"]], ids=["ar", "mdm", "mir"])
@pytest.mark.parametrize("reset_positions", [True, False], ids=["positions-reset", "positions-run-on"])
def test_packed_sequences_equal_the_document_mask(megatron_cpu, monkeypatch, objective_flags, reset_positions):
    """A model forward on packed sequences (the rows one stream, a sequence per document: transformer-engine's THD
    path) gives the per-token losses, logits and gradients of the dense document mask, with positions reset or
    running on; the scorer (validation, tools/evaluate.py) packs the same way."""
    from megatron_dataeff.evaluation.scoring import ModelScorer
    from megatron_dataeff.models import builder

    flags = ["--reset-attention-mask", "--eod-mask-loss"] + (["--reset-position-ids"] if reset_positions else [])
    cfg = _cfg(*objective_flags, "--attention-backend", "sdpa", *flags)
    torch.manual_seed(0)
    dense_model = build_model(cfg, VOCAB, "cpu")
    monkeypatch.setattr(builder, "attention_choice", lambda cfg, device: PACKED_SDPA)
    packed_model = build_model(cfg, VOCAB, "cpu")
    packed_model.load_state_dict(dense_model.state_dict())
    objective = build_objective(cfg, MASK, vocab_ids=VOCAB, eod_token_id=EOD)
    tokens = torch.stack([_windows(seed)[0][k] for seed in range(2) for k in range(2)])
    batch = objective.prepare(tokens, torch.arange(4))
    pos = batch.position_ids if batch.position_ids is not None else torch.arange(48).expand(batch.input_ids.shape)
    dense = dense_model(batch.input_ids, pos, batch.attention_mask, labels=batch.labels)
    packed = packed_forward(packed_model, batch.input_ids, pos, batch.row_mask, labels=batch.labels)
    assert packed.shape == dense.shape
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5)
    dense.sum().backward()
    packed.sum().backward()
    for (name, a), b in zip(dense_model.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m: name + m)
    with torch.no_grad():
        torch.testing.assert_close(packed_forward(packed_model, batch.input_ids, pos, batch.row_mask),
                                   dense_model(batch.input_ids, pos, batch.attention_mask), rtol=1e-5, atol=1e-5)
    scorers = [ModelScorer(m, diffusion=False, mask_token_id=MASK, max_length=48) for m in (dense_model, packed_model)]
    got = [sc.log_probs(batch.input_ids, pos, batch.attention_mask, batch.row_mask) for sc in scorers]
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="row mask"):
        scorers[1].log_probs(batch.input_ids, pos, batch.attention_mask)


def test_trainer_on_packed_sequences_follows_the_document_mask(megatron_cpu, monkeypatch, tmp_path):
    """The trainer's schedule on packed sequences (2 micro-batches a step) trains and validates as with the dense
    document mask: the same losses to fp32 rounding."""
    from megatron_dataeff.models import builder
    from megatron_dataeff.training.loop import Trainer

    def run(name):
        argv = ["--num-layers", "2", "--seq-length", "48", "--train-iters", "3", "--global-batch-size", "4",
                "--micro-batch-size", "2", "--eval-iters", "1", "--run-dir", str(tmp_path / name), "--device", "cpu",
                "--tensorboard-dir", "", "--objective", "mdm", "--attention-backend", "sdpa", *DOC_FLAGS]
        trainer = Trainer(config_from_args(build_parser().parse_args(argv)))
        try:
            assert trainer.forward_backward.packed == (name == "packed")
            return [trainer.train_step(i)[0] for i in range(3)] + [trainer.validate()]
        finally:
            trainer.close()

    dense = run("dense")
    monkeypatch.setattr(builder, "attention_choice", lambda cfg, device: PACKED_SDPA)
    packed = run("packed")
    torch.testing.assert_close(torch.tensor(packed, dtype=torch.float64), torch.tensor(dense, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_flags_parse_as_megatron_lm_names_them():
    """The three flags are Megatron-LM's names, off by default, recorded in the run's config."""
    cfg = _cfg(*DOC_FLAGS)
    assert (cfg.data.reset_position_ids, cfg.data.reset_attention_mask, cfg.data.eod_mask_loss) == (True,) * 3
    assert cfg.to_dict()["data"]["eod_mask_loss"] is True
    plain = _cfg()
    assert not (plain.data.reset_position_ids or plain.data.reset_attention_mask or plain.data.eod_mask_loss)


TRAIN = ["--train-iters", "4", "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "2",
         "--global-batch-size", "8", "--seq-length", "64", "--lr", "3e-3", "--num-layers", "2"]


def test_loss_is_the_same_for_any_micro_batch_split(tmp_path):
    """With the three flags, 1 micro-batch of 8 and 4 of 2 give the same train and validation losses (the
    normaliser is the global count of non-EOD positions, however the batch is split), and the run records its
    flags; the flags change the loss (windows of 256 bytes of the embedded corpus hold document ends: the corpus is
    the running Python's docstrings, so with windows of 64 some Python's first batches held none)."""
    flags = TRAIN + ["--objective", "mdm", "--seq-length", "256"] + DOC_FLAGS
    one = run_pretrain(flags + ["--micro-batch-size", "8"], tmp_path / "one")
    four = run_pretrain(flags + ["--micro-batch-size", "2"], tmp_path / "four")
    for split in ("train", "valid"):
        for x, y in zip(losses(one, split), losses(four, split), strict=True):
            assert abs(x - y) <= 1e-5 * abs(x)
    plain = run_pretrain(TRAIN + ["--objective", "mdm", "--seq-length", "256", "--micro-batch-size", "8"],
                         tmp_path / "plain")
    assert losses(plain) != losses(one)
    import json

    run = json.loads((tmp_path / "one" / "run.json").read_text())
    assert run["config"]["data"]["reset_attention_mask"] is True


def test_position_ids_reach_the_rotary_embedding(megatron_cpu):
    """With --reset-position-ids the rotary embedding takes each token's position id: 0..seq-1 gives megatron's
    own output bit for bit, restarted positions change what a bidirectional model computes across a boundary
    (no document mask), and shifting every position by the same amount changes nothing (RoPE is relative)."""
    torch.manual_seed(0)
    stock = build_model(_cfg("--objective", "mdm", "--max-position-embeddings", "64"), VOCAB, "cpu").eval()
    per_token = build_model(_cfg("--objective", "mdm", "--reset-position-ids", "--max-position-embeddings", "64"),
                            VOCAB, "cpu").eval()
    per_token.load_state_dict(stock.state_dict())
    assert per_token.config.reset_position_ids and not stock.config.reset_position_ids
    x = _windows()[0][:, :48]
    run_on = torch.arange(48).expand(2, 48)
    with torch.no_grad():
        want = stock(x, run_on, None)
        assert torch.equal(per_token(x, run_on, None), want)
        restarted = DocumentFlags(EOD, reset_position_ids=True).positions(x)
        assert not torch.allclose(per_token(x, restarted, None), want, atol=1e-3)
        torch.testing.assert_close(per_token(x, run_on + 7, None), want, rtol=1e-4, atol=1e-4)
