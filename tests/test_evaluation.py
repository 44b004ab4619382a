"""Evaluation: ELBO estimators, multiple-choice scoring, offline tasks, tools/evaluate.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_dataeff.data.tokenizers import ByteTokenizer
from megatron_dataeff.evaluation.effective_data import effective_data, fit_half_life
from megatron_dataeff.evaluation.scoring import ModelScorer
from megatron_dataeff.evaluation.tasks import (ChoiceExample, ClozeExample, build_cloze, build_continuation,
                                               evaluate_tasks, score_choices, score_cloze)
from tests.conftest import ROOT, run_pretrain

V = 258  # ByteTokenizer ids (EOD 256, [MASK] 257)
MASK = 257


class FixedDistribution(torch.nn.Module):
    """Predicts the same distribution q at every position, whatever the input: log p(x) is known."""

    def __init__(self, seed=0):
        super().__init__()
        self.logits = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 2

    def forward(self, input_ids, position_ids, attention_mask):
        return self.logits.expand(*input_ids.shape, V).clone()

    def log_q(self, ids):
        return float(torch.log_softmax(self.logits, -1)[torch.tensor(ids)].double().sum())


class NeighbourModel(torch.nn.Module):
    """Bidirectional toy whose prediction at a position depends on which neighbours are visible."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.left = torch.randn(V, V, generator=g) * 1.5
        self.right = torch.randn(V, V, generator=g) * 1.5
        self.base = torch.randn(V, generator=g)

    def forward(self, input_ids, position_ids, attention_mask):
        x = input_ids
        left = torch.cat([torch.full_like(x[:, :1], MASK), x[:, :-1]], 1)
        right = torch.cat([x[:, 1:], torch.full_like(x[:, :1], MASK)], 1)
        out = self.base.expand(*x.shape, V).clone()
        out = out + torch.where((left != MASK)[..., None], self.left[left], torch.zeros(()))
        out = out + torch.where((right != MASK)[..., None], self.right[right], torch.zeros(()))
        return out


class CountingModel(torch.nn.Module):
    """Token at position i is certainly x_0 + i (mod 256): the answer of a task is certain."""

    def forward(self, input_ids, position_ids, attention_mask):
        b, s = input_ids.shape
        target = (input_ids[:, :1] + torch.arange(s)[None, :] + 1) % 256  # next-token view for AR
        logits = torch.full((b, s, V), -30.0)
        logits.scatter_(-1, target[..., None], 30.0)
        return logits


class CountingBidirectional(CountingModel):
    def forward(self, input_ids, position_ids, attention_mask):
        b, s = input_ids.shape
        target = (input_ids[:, :1] + torch.arange(s)[None, :]) % 256  # position i holds x_0 + i
        logits = torch.full((b, s, V), -30.0)
        logits.scatter_(-1, target[..., None], 30.0)
        return logits


class RightToLeftBidirectional(torch.nn.Module):
    """A diffusion toy that can only be decoded right to left: the last position of the input is
    certainly "z"; a position whose right neighbour is visible is certainly that neighbour - 1; any
    other position guesses "a" with lower confidence.  Greedy low-confidence decoding of a masked
    suffix therefore yields "...wxyz" exactly when it unmasks the most confident position first,
    conditions on what it committed, and appends nothing after the masked answer."""

    def forward(self, input_ids, position_ids, attention_mask):
        x = input_ids
        b, s = x.shape
        right = torch.cat([x[:, 1:], torch.full_like(x[:, :1], MASK)], 1)
        logits = torch.full((b, s, V), -5.0)
        logits[..., ord("a")] = 2.0
        known = right != MASK
        logits[known] = torch.nn.functional.one_hot((right[known] - 1) % 256, V).float() * 30.0 - 5.0
        logits[:, -1] = -5.0
        logits[:, -1, ord("z")] = 30.0
        return logits


class LeftToRightBidirectional(torch.nn.Module):
    """A diffusion toy that can only be decoded left to right: a position whose left neighbour is
    visible is fairly surely that neighbour + 1; the last position of the input, while its left
    neighbour is masked, is certainly "q"; any other position guesses "a" with lower confidence.
    Most-confident-first decoding of a masked suffix commits "q" at the end first; left-to-right
    decoding after "abc" yields "defg"."""

    def forward(self, input_ids, position_ids, attention_mask):
        x = input_ids
        b, s = x.shape
        left = torch.cat([torch.full_like(x[:, :1], MASK), x[:, :-1]], 1)
        logits = torch.full((b, s, V), -5.0)
        logits[..., ord("a")] = 2.0
        logits[:, -1] = -5.0
        logits[:, -1, ord("q")] = 30.0
        known = left != MASK
        logits[known] = torch.nn.functional.one_hot((left[known] + 1) % 256, V).float() * 10.0 - 5.0
        return logits


def _scorer(model, diffusion, max_length=64, seed=0):
    return ModelScorer(model, diffusion=diffusion, mask_token_id=MASK, max_length=max_length,
                       tokenizer=ByteTokenizer(), seed=seed, batch_size=64)


CTX, CONT = list(b"Return the value"), list(b" of x.")


def test_elbo_estimators_equal_exact_nll_for_context_free_model():
    """With context-free predictions, exact ELBO and chain rule equal the exact NLL; MC is unbiased."""
    model = FixedDistribution()
    sc = _scorer(model, diffusion=True)
    exact_nll = model.log_q(CONT)
    assert sc.score(CTX, CONT, method="exact", greedy=False).logprob == pytest.approx(exact_nll, abs=1e-6)
    assert sc.score(CTX, CONT, method="chain", greedy=False).logprob == pytest.approx(exact_nll, abs=1e-6)
    # MC estimates vary with the masked sets; their mean over independent seeds is the NLL
    estimates = [ _scorer(model, True, seed=s).score(CTX, CONT, method="mc", mc_samples=8, greedy=False)
                 for s in range(40)]
    values = torch.tensor([e.logprob for e in estimates], dtype=torch.float64)
    assert values.std() > 1e-3  # the estimator is genuinely random here
    se = float(values.std() / math.sqrt(len(values)))
    assert abs(float(values.mean()) - exact_nll) < 4 * se
    # the single-answer standard error is of the right size (sample std of the mean of 8 terms)
    mean_se = float(torch.tensor([e.stderr for e in estimates]).mean())
    assert 0.3 < mean_se / float(values.std()) < 3.0


def test_mc_and_chain_rule_agree_with_exact_elbo_on_context_dependent_model():
    """On a model whose predictions depend on visible neighbours, MC ELBO and random-order chain rule
    both agree with the exactly enumerated ELBO within their standard errors."""
    sc = _scorer(NeighbourModel(), diffusion=True, seed=3)
    exact = sc.score(CTX, CONT, method="exact", greedy=False).logprob
    mc = sc.score(CTX, CONT, method="mc", mc_samples=128, greedy=False)
    chain = sc.score(CTX, CONT, method="chain", chain_order="random", mc_samples=64, greedy=False)
    assert mc.stderr > 0 and chain.stderr > 0
    assert abs(mc.logprob - exact) < 4 * mc.stderr
    assert abs(chain.logprob - exact) < 4 * chain.stderr
    # left-to-right chain rule is a different (proper) likelihood: it need not equal the ELBO
    l2r = sc.score(CTX, CONT, method="chain", greedy=False).logprob
    assert math.isfinite(l2r)


def test_single_token_answer_is_exact_with_one_sample():
    """One masked token has one configuration: MC with L = 1 equals the exact ELBO."""
    sc = _scorer(NeighbourModel(), diffusion=True)
    mc = sc.score(CTX, [ord("x")], method="mc", mc_samples=64, greedy=False)
    assert mc.stderr == 0.0
    assert mc.logprob == pytest.approx(sc.score(CTX, [ord("x")], method="exact", greedy=False).logprob, abs=1e-9)


@pytest.mark.parametrize("diffusion", [False, True])
def test_multiple_choice_picks_the_certain_answer(diffusion):
    """Where the answer is certain under the model, multiple choice and cloze are always right."""
    model = CountingBidirectional() if diffusion else CountingModel()
    sc = _scorer(model, diffusion)
    examples = []
    for start in ("abcd", "KLMN", "0123"):
        true = "".join(chr(ord(start[0]) + 4 + i) for i in range(4))
        choices = ["zzzz", true, true[::-1], "a1b2"]
        examples.append(ChoiceExample(start, choices, 1))
    res = score_choices(sc, examples, mc_samples=8)
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0
    wrong = [ChoiceExample(e.context, e.choices, 0) for e in examples]
    assert score_choices(sc, wrong, mc_samples=8)["acc"] == 0.0
    cloze = [ClozeExample("abcd", "efg"), ClozeExample("abcd", "xyz")]
    res = score_cloze(sc, cloze, mc_samples=8)
    assert res["acc"] == 0.5


def test_diffusion_cloze_decodes_the_masked_answer_most_confident_first():
    """Cloze for diffusion: the answer's positions are masked at the end of the input and decoded one
    token per step, most confident first, each step conditioned on the tokens already committed."""
    sc = _scorer(RightToLeftBidirectional(), diffusion=True)
    ctx = list(b"abc")
    assert sc.score(ctx, list(b"wxyz"), method="exact").is_greedy
    assert not sc.score(ctx, list(b"wxya"), method="exact").is_greedy
    # "aaaz" is what decoding all positions at once (or left to right) would give
    assert not sc.score(ctx, list(b"aaaz"), method="exact").is_greedy
    res = score_cloze(sc, [ClozeExample("abc", "vwxyz"), ClozeExample("abc", "axyz"), ClozeExample("ab", "xyz")])
    assert res["acc"] == pytest.approx(2 / 3)


def test_diffusion_greedy_order_l2r_decodes_the_leftmost_masked_position_first():
    """greedy_order="l2r" commits the leftmost masked position each step: it reproduces an answer
    only a left-to-right decoder gets and misses one only most-confident-first decoding gets."""
    l2r_model = _scorer(LeftToRightBidirectional(), diffusion=True)
    ctx = list(b"abc")
    assert l2r_model.score(ctx, list(b"defg"), method="exact", greedy_order="l2r").is_greedy
    assert not l2r_model.score(ctx, list(b"defg"), method="exact").is_greedy
    assert l2r_model.score(ctx, list(b"defq"), method="exact").is_greedy
    assert not l2r_model.score(ctx, list(b"defq"), method="exact", greedy_order="l2r").is_greedy
    r2l_model = _scorer(RightToLeftBidirectional(), diffusion=True)
    assert not r2l_model.score(ctx, list(b"wxyz"), method="exact", greedy_order="l2r").is_greedy
    assert r2l_model.score(ctx, list(b"aaaz"), method="exact", greedy_order="l2r").is_greedy
    cloze = [ClozeExample("abc", "defg"), ClozeExample("abc", "defq"), ClozeExample("xyz", "{|}~")]
    assert score_cloze(l2r_model, cloze, greedy_order="l2r")["acc"] == pytest.approx(2 / 3)
    assert score_cloze(l2r_model, cloze)["acc"] == pytest.approx(1 / 3)
    assert evaluate_tasks(l2r_model, {"cloze": cloze}, greedy_order="l2r")["cloze"]["acc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("diffusion", [False, True])
def test_greedy_order_is_checked_and_ignored_by_ar(diffusion):
    """An unknown greedy_order raises, naming the option and its values; AR scores are the same in
    either order (AR greedy is left to right)."""
    sc = _scorer(CountingBidirectional() if diffusion else CountingModel(), diffusion)
    with pytest.raises(ValueError, match="greedy_order must be one of confidence, l2r, got 'r2l'"):
        sc.score(list(b"abcd"), list(b"efgh"), method="exact", greedy_order="r2l")
    scores = [sc.score(list(b"abcd"), list(cont), method="exact", greedy_order=order)
              for order in ("confidence", "l2r") for cont in (b"efgh", b"efgX")]
    assert [s.is_greedy for s in scores] == [True, False, True, False]
    assert scores[0] == scores[2] and scores[1] == scores[3]


def test_evaluate_cli_passes_greedy_order(monkeypatch, capsys):
    """tools/evaluate.py --greedy-order reaches evaluate_checkpoint (default confidence); other values
    are refused by the parser."""
    import importlib.util

    from megatron_dataeff.evaluation import checkpoint_eval

    spec = importlib.util.spec_from_file_location("_tool_evaluate", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    calls = []
    monkeypatch.setattr(checkpoint_eval, "evaluate_checkpoint", lambda path, **kw: calls.append(kw) or {"x": 1})
    assert tool.main(["--load", "ckpt", "--json", "--greedy-order", "l2r"]) == 0
    assert tool.main(["--load", "ckpt", "--json"]) == 0
    assert [c["greedy_order"] for c in calls] == ["l2r", "confidence"]
    with pytest.raises(SystemExit):
        tool.main(["--load", "ckpt", "--greedy-order", "r2l"])
    assert "invalid choice" in capsys.readouterr().err


def test_offline_tasks_are_deterministic_for_a_seed():
    """The cloze and continuation tasks depend only on the documents and the seed."""
    docs = [(f"Document {d} explains the parser. The parser reads tokens from the stream. "
             f"Each token has a kind and a value number {d}. The stream ends with a marker. "
             f"Errors raise ValueError when the parser meets an unknown token. ") * 3 for d in range(12)]
    a, b = build_continuation(docs, 20, seed=5), build_continuation(docs, 20, seed=5)
    assert a and [(x.context, x.choices, x.label) for x in a] == [(x.context, x.choices, x.label) for x in b]
    assert all(len(set(x.choices)) == 4 for x in a)
    c = build_continuation(docs, 20, seed=6)
    assert [(x.context, x.choices) for x in a] != [(x.context, x.choices) for x in c]
    z1, z2 = build_cloze(docs, 20, seed=5), build_cloze(docs, 20, seed=5)
    assert z1 and [(x.context, x.target) for x in z1] == [(x.context, x.target) for x in z2]
    assert all(x.target.strip() in x.context for x in z1)


def test_effective_data_fit_recovers_half_life():
    """R* of a curve generated from Muennighoff's model is recovered; a run that keeps improving as
    if on fresh data is reported as not identifiable."""
    U, E, A, alpha = 5e4, 1.5, 40.0, 0.3
    tokens = [U * x for x in (0.25, 0.5, 1, 2, 4, 8, 12, 16, 20)]
    ref_loss = [E + A * t ** -alpha for t in tokens]
    epochs = [1, 2, 3, 4, 6, 8, 10, 12, 16, 20]
    loss = [E + A * float(effective_data(e - 1, U, 5.0)) ** -alpha for e in epochs]
    fit = fit_half_life(epochs, loss, U, tokens, ref_loss)
    assert fit.r_star is not None and fit.r_star == pytest.approx(5.0, rel=0.1)
    fresh_like = [E + A * (U * e) ** -alpha for e in epochs]
    assert fit_half_life(epochs, fresh_like, U, tokens, ref_loss).r_star is None


# ----------------------------------------------------------------------------------------------
# A real (tiny) checkpoint


def _evaluate_json(*args) -> dict:
    """tools/evaluate.py --json's one line, as a dict."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--json", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def _evaluate_in_process(capsys, *args) -> dict:
    """tools/evaluate.py's main in this process (its --json line as a dict): no interpreter start-up."""
    from tools.evaluate import main

    capsys.readouterr()
    assert main(["--json", *args]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def mdm_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_mdm")
    records = run_pretrain(["--objective", "mdm", "--num-layers", "1", "--hidden-size", "64",
                            "--ffn-hidden-size", "128", "--num-attention-heads", "2", "--seq-length", "32",
                            "--micro-batch-size", "8", "--train-iters", "30", "--lr", "3e-3",
                            "--eval-interval", "30", "--eval-iters", "2", "--split", "90,10,0",
                            "--save", str(run / "ckpt"), "--tensorboard-dir", ""], run)
    val = [r for r in records if r["split"] == "valid"][-1]
    return run / "ckpt", val["loss"]


def test_evaluate_cli_json_reproduces_trainer_validation(mdm_checkpoint):
    """tools/evaluate.py --json: one line with val_loss ± stderr and task accuracies; with one MC
    sample on the trainer's windows it reproduces the ELBO the trainer logged."""
    ckpt, logged = mdm_checkpoint
    res = _evaluate_json("--load", str(ckpt), "--mc-samples", "1", "--eval-windows", "16", "--tasks",
                         "cloze,continuation", "--num-examples", "4", "--greedy-order", "l2r")
    assert res["val_loss"] == pytest.approx(logged, rel=1e-6)
    assert res["val_loss_stderr"] > 0 and res["tokens"] == 16 * 32
    assert 0.0 <= res["continuation_acc"] <= 1.0 and 0.0 <= res["cloze_acc"] <= 1.0
    assert res["greedy_order"] == "l2r"


def test_evaluate_reproduces_trainer_validation_on_a_blended_run(megatron_cpu, tmp_path, capsys):
    """--data-path 0.5 A 0.5 B: tools/evaluate.py validates on the blend's windows (both datasets, built by
    the trainer's own data builder) and reproduces the trainer's final validation loss; B alone differs."""
    import numpy as np

    from megatron_dataeff.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    prefixes = {}
    for name, (low, high) in {"a": (0, 64), "b": (128, 256)}.items():  # two distributions of byte ids
        prefixes[name] = str(tmp_path / name)
        with IndexedDatasetWriter(prefixes[name], vocab_size=258) as w:
            for _ in range(20):
                w.add_document(list(rng.integers(low, high, 160)) + [256])
    ckpt = tmp_path / "ckpt"
    records = run_pretrain(["--data-path", "0.5", prefixes["a"], "0.5", prefixes["b"], "--split", "80,20,0",
                            "--num-layers", "1", "--seq-length", "32", "--micro-batch-size", "8",
                            "--train-iters", "4", "--eval-interval", "4", "--eval-iters", "4", "--save", str(ckpt),
                            "--tensorboard-dir", ""], tmp_path / "run")
    logged = [r for r in records if r["split"] == "valid"][-1]["loss"]
    res = _evaluate_in_process(capsys, "--load", str(ckpt), "--eval-windows", "32")
    assert res["windows"] == 32 and res["val_loss"] == pytest.approx(logged, rel=1e-6)
    b_only = _evaluate_in_process(capsys, "--load", str(ckpt), "--eval-windows", "32", "--data-path", prefixes["b"])
    assert abs(b_only["val_loss"] - logged) > 0.05


@pytest.mark.parametrize("objective", ["ar", "dual", "mdm"])
def test_evaluate_reproduces_trainer_validation_of_packed_documents(megatron_cpu, tmp_path, capsys, objective):
    """--reset-position-ids --reset-attention-mask --eod-mask-loss on windows of short documents: tools/evaluate.py
    hands the model each validation batch's positions and document masks as the trainer's forward step does and
    normalises by the windows' own non-EOD counts, and reproduces the validation loss the trainer logged (a dual
    model in both views, masked diffusion's ELBO)."""
    import numpy as np

    from megatron_dataeff.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "docs")
    with IndexedDatasetWriter(prefix, vocab_size=258) as w:
        for _ in range(1000):  # several documents in every 33-token window
            w.add_document(list(rng.integers(0, 256, int(rng.integers(3, 12)))) + [256])
    ckpt = tmp_path / "ckpt"
    records = run_pretrain(["--objective", objective, "--data-path", prefix, "--split", "80,20,0",
                            "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss", "--num-layers", "1",
                            "--seq-length",
                            "32", "--micro-batch-size", "8", "--train-iters", "4", "--eval-interval", "4",
                            "--eval-iters", "2", "--save", str(ckpt), "--tensorboard-dir", ""], tmp_path / "run")
    logged = [r for r in records if r["split"] == "valid"][-1]
    res = _evaluate_in_process(capsys, "--load", str(ckpt), "--eval-windows", "16", "--mc-samples", "1")
    assert res["windows"] == 16 and res["val_loss"] == pytest.approx(logged["loss"], rel=1e-6)
    if objective == "dual":
        assert res["val_loss_mdm"] == pytest.approx(logged["loss_mdm"], rel=1e-6)


def test_chain_rule_and_mc_agree_on_trained_tiny_model(mdm_checkpoint, megatron_cpu):
    """On a trained tiny diffusion model: MC ELBO and random-order chain rule agree with the exact
    ELBO of a short answer within their standard errors."""
    sc = ModelScorer.from_checkpoint(str(mdm_checkpoint[0]))
    ctx, cont = sc.encode("Return the number of"), sc.encode(" items")
    exact = sc.score(ctx, cont, method="exact", greedy=False).logprob
    mc = sc.score(ctx, cont, method="mc", mc_samples=64, greedy=False)
    chain = sc.score(ctx, cont, method="chain", chain_order="random", mc_samples=48, greedy=False)
    assert abs(mc.logprob - exact) < 4 * mc.stderr + 1e-6
    assert abs(chain.logprob - exact) < 4 * chain.stderr + 1e-6


def test_evaluate_reports_both_views_of_a_dual_checkpoint(megatron_cpu, tmp_path, capsys):
    """tools/evaluate.py on an --objective dual checkpoint: the AR NLL (val_loss, val_loss_ar) and the
    diffusion ELBO (val_loss_mdm) the trainer logged for the same windows; tools/generate.py needs --view."""
    ckpt = tmp_path / "ckpt"
    records = run_pretrain(["--objective", "dual", "--num-layers", "1", "--seq-length", "32", "--micro-batch-size",
                            "8", "--train-iters", "4", "--eval-interval", "4", "--eval-iters", "2", "--save", str(ckpt),
                            "--tensorboard-dir", ""], tmp_path / "run")
    logged = [r for r in records if r["split"] == "valid"][-1]
    res = _evaluate_in_process(capsys, "--load", str(ckpt), "--eval-windows", "16", "--mc-samples", "1")
    assert res["objective"] == "dual" and res["val_loss"] == res["val_loss_ar"]
    assert res["val_loss_ar"] == pytest.approx(logged["loss_ar"], rel=1e-6)
    assert res["val_loss_mdm"] == pytest.approx(logged["loss_mdm"], rel=1e-6)
    from tools.generate import main as generate_main

    assert generate_main(["--load", str(ckpt), "--prompt", "The", "--max-new-tokens", "4"]) == 2
    assert "--view ar or --view mdm" in capsys.readouterr().err
