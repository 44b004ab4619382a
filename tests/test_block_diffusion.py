"""Block diffusion (BD3-LM): the objective between AR and masked diffusion (real megatron-core GPTModels on CPU)."""

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.config import ConfigError
from megatron_dataeff.models.builder import build_model
from megatron_dataeff.objectives import BlockDiffusionObjective, build_objective
from megatron_dataeff.training import flops
from tests.conftest import losses, run_pretrain

VOCAB, EOD, MASK = 258, 256, 257
L = 32


def _cfg(*argv):
    cfg = config_from_args(build_parser().parse_args(["--num-layers", "2", "--seq-length", str(L), *argv]))
    cfg.validate_layout(1)
    return cfg


def _model(backend="sdpa", seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg("--objective", "block", "--block-size", "4", "--attention-backend", backend), VOCAB,
                       "cpu").eval()


def _tokens(rows=3, seed=0):
    return torch.randint(0, 256, (rows, L + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["sdpa", "flex", "local"])
def test_one_block_is_masked_diffusion(megatron_cpu, backend):
    """B = seq draws mdm's noise and gives exactly the mdm objective's per-token losses and loss with the same
    weights (the noisy half sees only itself)."""
    model = _model(backend)
    mdm = build_objective(_cfg("--objective", "mdm"), MASK)
    block = build_objective(_cfg("--objective", "block", "--block-size", str(L)), MASK)
    tokens, index = _tokens(), torch.tensor([5, 6, 7])
    a, b = mdm.prepare(tokens, index), block.prepare(tokens, index)
    assert torch.equal(a.input_ids, b.input_ids[:, :L]) and torch.equal(b.input_ids[:, L:], tokens[:, :-1])
    assert torch.equal(a.loss_weight, b.loss_weight[:, :L]) and not b.loss_weight[:, L:].any()
    with torch.no_grad():
        per_a = model(a.input_ids, torch.arange(L).expand(3, L), None, labels=a.labels)
        per_b = model(b.input_ids, b.position_ids, b.attention_mask, labels=b.labels)
    torch.testing.assert_close(per_b[:, :L], per_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.loss(per_b, b)[0], mdm.loss(per_a, a)[0], rtol=1e-6, atol=1e-6)
    assert block.loss(per_b, b)[1] == mdm.loss(per_a, a)[1] == 3 * L


def test_blocks_of_one_token_all_masked_are_next_token_prediction(megatron_cpu):
    """B = 1 with every token masked: position i's loss is the cross-entropy of x0[i] given the clean prefix
    x0[:i] (a mask token at position i after a causal prefix), computed here one prefix at a time."""
    model = _model()
    block = build_objective(_cfg("--objective", "block", "--block-size", "1"), MASK)
    tokens = _tokens(rows=1)
    batch = block.prepare(tokens, torch.tensor([0]))
    batch.input_ids[:, :L] = MASK  # every block masked
    with torch.no_grad():
        per = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels)[0, :L]
        x0 = tokens[0, :-1]
        for i in (0, 1, 7, L - 1):
            x = torch.cat([x0[:i], torch.tensor([MASK])])[None]
            n = i + 1
            causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # True = masked out
            causal[-1, :] = False  # the masked query sees the whole prefix
            causal[-1, -1] = False
            want = model(x, torch.arange(n)[None], causal[None, None], labels=x0[:n][None])[0, -1]
            torch.testing.assert_close(per[i], want, rtol=1e-5, atol=1e-5)


def _input_grad(model, batch, positions):
    """d(sum of per-token losses at `positions`)/d(input embeddings): [2L, batch, hidden]."""
    kept = {}

    def hook(module, args, out):
        out.retain_grad()
        kept["out"] = out

    handle = model.embedding.register_forward_hook(hook)
    per = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels)
    handle.remove()
    per[:, positions].sum().backward()
    return kept["out"].grad


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_what_each_half_sees(megatron_cpu, backend):
    """Gradients, not only the mask: the clean half's outputs never depend on a noisy token; noisy block k
    depends on its own noisy tokens and on the clean blocks before it, never on its own clean block or later
    blocks."""
    model = _model(backend)
    model.train()
    block = build_objective(_cfg("--objective", "block", "--block-size", "4"), MASK)
    batch = block.prepare(_tokens(rows=2), torch.tensor([1, 2]))
    grad = _input_grad(model, batch, list(range(L, 2 * L)))  # every clean position's loss
    assert torch.count_nonzero(grad[:L]) == 0 and torch.count_nonzero(grad[L:]) > 0
    model.zero_grad()
    k = 3  # noisy block 3: positions 12..15
    grad = _input_grad(model, batch, list(range(4 * k, 4 * k + 4)))
    noisy, clean = grad[:L], grad[L:]
    assert torch.count_nonzero(noisy[4 * k:4 * k + 4]) > 0 and torch.count_nonzero(clean[:4 * k]) > 0
    assert torch.count_nonzero(noisy[:4 * k]) == 0 and torch.count_nonzero(noisy[4 * k + 4:]) == 0
    assert torch.count_nonzero(clean[4 * k:]) == 0


def test_noise_is_per_block_and_keyed_by_sample():
    """Per-block noise: each block its own rate (the first is mdm's t), the same for a sample in any batch;
    shared noise: one rate per sequence; evaluation copies stratify every block's rate over [0, 1)."""
    per_block = BlockDiffusionObjective(MASK, 7, block_size=8)
    shared = BlockDiffusionObjective(MASK, 7, block_size=8, shared_noise=True)
    index = torch.arange(64)
    p = per_block.rates(index, 4, 0)
    assert p.shape == (64, 4) and (p[:, 1:] != p[:, :1]).any()
    assert torch.equal(per_block.rates(index[10:12], 4, 0), p[10:12])
    assert torch.equal(shared.rates(index, 4, 0), p[:, :1].expand(-1, 4))
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    copies = per_block.prepare_evaluation(tokens, torch.tensor([0, 1]), copies=4)
    assert copies.input_ids.shape == (8, 64)
    rates = per_block.rates(torch.arange(8), 4, 16, stratify=4)  # evaluation stream, 4 strata
    t = (rates.double() - 1e-3) / (1 - 1e-3)  # copy j of a window has t in [j / 4, (j + 1) / 4) in every block
    strata = torch.arange(8)[:, None] % 4
    assert bool(((t >= strata / 4 - 1e-6) & (t < (strata + 1) / 4 + 1e-6)).all())


def test_flags_are_checked_by_name():
    """--block-size is needed by --objective block, must divide --seq-length, and means nothing elsewhere."""
    with pytest.raises(ConfigError, match="--objective block needs --block-size"):
        _cfg("--objective", "block")
    with pytest.raises(ConfigError, match="--block-size 5 does not divide --seq-length 32"):
        _cfg("--objective", "block", "--block-size", "5")
    with pytest.raises(ConfigError, match="--block-noise needs --objective block"):
        _cfg("--objective", "mdm", "--block-noise", "shared")


def test_flops_and_memory_count_the_doubled_rows():
    """A block-diffusion step costs about twice an mdm step of the same window (rows of 2L tokens)."""
    mdm, block = _cfg("--objective", "mdm"), _cfg("--objective", "block", "--block-size", "4")
    ratio = flops.flops_per_step(block, 384) / flops.flops_per_step(mdm, 384)
    assert 1.9 < ratio < 2.0


TRAIN = ["--train-iters", "4", "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "2",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--seq-length", "64", "--lr", "3e-3",
         "--num-layers", "2", "--objective", "block", "--block-size", "16"]


def test_block_diffusion_trains_with_packed_documents(tmp_path):
    """pretrain_diffusion.py trains block diffusion (with the document flags too): finite losses, a validation
    ELBO, the block size and flags recorded in run.json."""
    recs = run_pretrain(TRAIN + ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"], tmp_path)
    train, valid = losses(recs), losses(recs, "valid")
    assert len(train) == 4 and all(0 < x < 20 for x in train) and len(valid) == 1
    import json

    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["objective"]["block_size"] == 16 and run["config"]["data"]["reset_attention_mask"]


def test_block_checkpoint_validates_exports_samples_and_scores(megatron_cpu, tmp_path, capsys):
    """A block-diffusion checkpoint: tools/evaluate.py gives the trainer's validation ELBO (same windows, same
    noise); the HF export (trust_remote_code) computes the in-process logits of a [x_t | x_0] row under the block
    mask (1e-4), its KV cache the logits of recomputing, and its `generate` gives tools/generate.py's tokens block by
    block (greedy and sampled, same seed); task scoring takes the block ELBO (exact for one token) and the block sampler's greedy decoding."""
    import json

    from transformers import AutoModel

    from megatron_dataeff.evaluation.checkpoint_eval import evaluate_checkpoint
    from megatron_dataeff.export.hf_export import export_checkpoint
    from megatron_dataeff.export.modeling_dataeff_mdm import block_diffusion_keep
    from megatron_dataeff.inference.generate import generate_text
    from megatron_dataeff.inference.loading import load_model_for_inference
    from megatron_dataeff.objectives.row_masks import RowMask
    from tools.evaluate import main

    ckpt = tmp_path / "ckpt"
    recs = run_pretrain(TRAIN + ["--save", str(ckpt), "--tensorboard-dir", ""], tmp_path / "run")
    capsys.readouterr()
    assert main(["--json", "--load", str(ckpt), "--eval-windows", "16", "--val-mc-samples", "1"]) == 0
    res = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    assert res["val_loss"] == pytest.approx(losses(recs, "valid")[-1], rel=1e-5)

    hf_dir = tmp_path / "hf"
    export_checkpoint(str(ckpt), str(hf_dir))
    hf = AutoModel.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32).eval()
    assert hf.config.block_size == 16
    model, _, _ = load_model_for_inference(str(ckpt))
    # the modeling file's mask is the trainer's (one definition each side of the export, checked equal)
    keep = block_diffusion_keep(64, 16)
    assert torch.equal(~keep, RowMask(False, rows=1, seq=128, block_size=16, device="cpu").dense()[0, 0])
    block = build_objective(_cfg("--objective", "block", "--block-size", "16", "--seq-length", "64"), MASK)
    batch = block.prepare(torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(3)),
                          torch.tensor([0, 1]))
    with torch.no_grad():
        want = model(batch.input_ids, batch.position_ids, batch.attention_mask)[..., :hf.config.valid_vocab_size]
        got = hf(batch.input_ids, attention_mask=keep[None, None], position_ids=batch.position_ids).logits
    assert (got[..., :hf.config.valid_vocab_size] - want).abs().max() <= 1e-4

    # the export's KV cache (clean blocks kept as keys and values) gives the logits of recomputing the training form
    from megatron_dataeff.export.modeling_dataeff_mdm import BlockKVCache, BlockRecompute

    seq = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    recompute = BlockRecompute(lambda i, p, k: hf(i, attention_mask=k[None, None], position_ids=p).logits, 16)
    cached = BlockKVCache(hf)
    with torch.no_grad():
        for block_start, start, end in ((16, 18, 32), (32, 32, 40)):
            diff = (cached.logits(seq, block_start, start, end) - recompute.logits(seq, block_start, start, end))
            assert diff.abs().max() <= 1e-4
            cached.block_done(seq, block_start, end)

    prompt = "def add(a, b):"
    ids = list(prompt.encode())
    for temperature in (0.0, 1.0):
        cli = generate_text(str(ckpt), prompt, 24, temperature=temperature, seed=5, steps=4)
        out = hf.generate(torch.tensor([ids]), gen_length=24, steps=4, temperature=temperature, seed=5)
        assert out[0, :len(ids)].tolist() == ids and cli["token_ids"] == out[0, len(ids):].tolist()
        assert len(cli["token_ids"]) == 24 and MASK not in cli["token_ids"]

    # task scoring: the block ELBO of an answer (exact for one token), greedy = what the block sampler decodes
    from megatron_dataeff.evaluation.scoring import ModelScorer

    scorer = ModelScorer.from_checkpoint(str(ckpt))
    assert scorer.block_size == 16
    greedy = generate_text(str(ckpt), prompt, 20)["token_ids"]  # one token per step, as the greedy check decodes
    assert scorer.score(ids, greedy, mc_samples=4).is_greedy
    assert not scorer.score(ids, greedy[:-1] + [(greedy[-1] + 1) % 256], mc_samples=4).is_greedy
    one = scorer.score(ids, greedy[:1], mc_samples=3)
    x = torch.tensor([ids + [MASK]])
    rows = torch.cat([x, x], 1)
    n = x.shape[1]
    mask = RowMask(False, rows=1, seq=2 * n, block_size=16, device="cpu").dense()
    with torch.no_grad():
        lp = torch.log_softmax(model(rows, torch.arange(n).repeat(2)[None], mask).float(), -1)[0, n - 1, greedy[0]]
    assert one.logprob == pytest.approx(float(lp), abs=1e-4) and one.stderr == pytest.approx(0.0, abs=1e-6)
    res = evaluate_checkpoint(str(ckpt), tasks=["cloze"], num_examples=4, mc_samples=2, validation=False)
    assert 0.0 <= res["cloze_acc"] <= 1.0
    # the lm-eval adapter: the same scores, and generate_until decodes with the block sampler
    from types import SimpleNamespace

    from megatron_dataeff.evaluation.lm_eval_adapter import MegatronDataEffLM

    lm = MegatronDataEffLM(scorer=scorer, mc_samples=4)
    text = scorer.tokenizer.detokenize(greedy)
    (logprob, is_greedy), = lm.loglikelihood([SimpleNamespace(args=(prompt, text))])
    assert is_greedy and logprob == pytest.approx(scorer.score(ids, greedy, mc_samples=4).logprob, rel=1e-6)
    gen, = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [], "max_gen_toks": 20}))])
    assert gen == generate_text(str(ckpt), prompt, 20)["text"]
