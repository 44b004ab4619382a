"""Two gloo processes: TP=2 (with and without sequence parallelism), DP=2 and PP=2 reproduce the TP=1 loss
curve and validation loss (MLP dropout, sdpa vs unfused attention and the chunked loss included); PP=2 trains.

Tolerance: relative 1e-5 per step and for the final validation loss (on CPU the curves agree to the last
printed digit; reductions in another order may move the last float bits: PP=2 measured 5.5e-8).
"""

import json

import pytest

from tests.conftest import ROOT, losses, run_pretrain

pytestmark = pytest.mark.distributed

TRAIN_ITERS = 12  # one train record per step (--log-interval 1); one validation record, at the end
COMMON = ["--train-iters", str(TRAIN_ITERS), "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "2",
          "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64", "--lr", "3e-3",
          "--num-layers", "2", "--lr-warmup-iters", "2"]
OBJECTIVES = {"ar": ["--objective", "ar"], "mdm": ["--objective", "mdm"],
              "ar+token_dropout": ["--objective", "ar", "--token-dropout-rate", "0.5",
                                   "--token-dropout-schedule", "uniform"],
              # MLP dropout masks are keyed by the element's place in the unsharded activation
              "ar+mlp_dropout": ["--objective", "ar", "--mlp-dropout", "0.3"],
              # megatron's unfused attention at TP=1: the reference for sdpa at TP=2
              "mdm+unfused": ["--objective", "mdm", "--attention-backend", "local"],
              # every token-dropout corruption at once (the torch path), annealed, as MIR's auxiliary loss
              "ar+corruptions": ["--objective", "ar", "--token-dropout-rate", "0.5", "--token-dropout-schedule",
                                 "uniform", "--token-dropout-noise", "mixed", "--token-dropout-span", "3",
                                 "--token-dropout-anneal", "cosine", "--token-dropout-final-rate", "0.1",
                                 "--token-dropout-aux-weight", "0.5"],
              # AR and masked diffusion per sample, each row with its own attention mask
              "dual": ["--objective", "dual", "--ar-fraction", "0.4"]}
# Packed documents (Megatron-LM's three flags): masks, positions and the non-EOD normaliser in every layout
DOCS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
OBJECTIVES.update({"ar+docs": ["--objective", "ar", "--token-dropout-rate", "0.3", "--token-dropout-aux-weight",
                               "0.5", *DOCS],
                   "mdm+docs": ["--objective", "mdm", *DOCS],
                   "dual+docs": ["--objective", "dual", "--ar-fraction", "0.4", *DOCS],
                   # block diffusion: rows of twice the window ([x_t | x_0]) through every layout
                   "block+docs": ["--objective", "block", "--block-size", "16", *DOCS]})


class _Baselines(dict):
    """TP=1 single-process curves by objective name, each run the first time a test asks for it (a leg that runs
    some of the tests runs only their baselines)."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, name):
        self[name] = run_pretrain(COMMON + OBJECTIVES[name], self.tmp_path_factory.mktemp(f"tp1_{name}"))
        return self[name]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """TP=1 single-process curves of each objective."""
    return _Baselines(tmp_path_factory)


def _assert_same_curve(a, b, n, rel=1e-5):
    """a and b hold n values each, equal to `rel` (relative) value by value."""
    assert len(a) == len(b) == n
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= rel * abs(x), f"record {step}: {x} vs {y}"


def _assert_same_losses(want, got):
    """The TP=1 train curve (one loss a step) and final validation loss, reproduced by another layout."""
    _assert_same_curve(losses(want), losses(got), TRAIN_ITERS)
    _assert_same_curve(losses(want, "valid"), losses(got, "valid"), 1)


TP2 = ["--tensor-model-parallel-size", "2"]
SP2 = TP2 + ["--sequence-parallel"]
DP2 = ["--use-distributed-optimizer"]  # 2 processes at TP=1 are DP=2


@pytest.mark.parametrize("objective, layout", [
    ("ar", TP2), ("ar", DP2), ("mdm", TP2), ("mdm", DP2), ("ar+token_dropout", DP2), ("ar+mlp_dropout", TP2),
    ("ar", SP2), ("mdm", SP2), ("mdm+unfused", TP2 + ["--attention-backend", "sdpa"]),
    ("ar", TP2 + ["--cross-entropy-chunk-size", "16"]), ("ar+corruptions", DP2), ("dual", TP2),
    ("ar+docs", SP2), ("mdm+docs", SP2), ("dual+docs", SP2), ("block+docs", SP2),
], ids=["ar-tp2", "ar-dp2", "mdm-tp2", "mdm-dp2", "token_dropout-dp2", "mlp_dropout-tp2", "ar-tp2-sp", "mdm-tp2-sp",
        "mdm-sdpa-tp2-vs-unfused-tp1", "ar-tp2-chunked-loss", "corruptions-mir-dp2", "dual-tp2",
        "docs-mir-tp2-sp", "docs-mdm-tp2-sp", "docs-dual-tp2-sp", "docs-block-tp2-sp"])
def test_two_process_layout_reproduces_tp1(baselines, tmp_path, objective, layout):
    """TP=2 (also with sequence parallelism, with sdpa against unfused attention, with the loss in
    16-token chunks over the vocabulary shards) and DP=2 (distributed optimizer) give the TP=1 train and
    validation losses."""
    recs = run_pretrain(COMMON + OBJECTIVES[objective] + layout, tmp_path, nproc=2)
    _assert_same_losses(baselines[objective], recs)


def _pp2_from_baseline_weights(baselines, tmp_path, objective, script=ROOT / "pretrain_diffusion.py"):
    """The records of a PP=2 run of `objective` started from its TP=1 baseline's initial weights."""
    # megatron seeds each stage apart (seed + 100 * stage), so PP=2 draws other initial weights than TP=1.
    # One TP=1 step at lr 1e-30 (updates below fp32 resolution) saves the baseline's initial weights;
    # --finetune loads only them, at iteration 0 with a fresh optimizer, so the runs see the same data.
    init = tmp_path / "init"
    first = run_pretrain(COMMON + OBJECTIVES[objective] + ["--train-iters", "1", "--lr", "1e-30", "--lr-warmup-iters",
                                                       "0", "--eval-iters", "0", "--save", str(init)],
                         tmp_path / "init_run")
    assert losses(first) == losses(baselines[objective])[:1]  # the baseline's initial weights, bit for bit
    return run_pretrain(COMMON + OBJECTIVES[objective] + ["--pipeline-model-parallel-size", "2", "--load", str(init),
                                                      "--finetune"], tmp_path / "pp2", nproc=2, script=script)


@pytest.mark.parametrize("objective", ["mdm", "ar+corruptions", "ar+docs", "mdm+docs", "dual+docs", "block+docs"])
def test_pipeline_parallel_reproduces_tp1(baselines, tmp_path, objective):
    """PP=2 (1F1B over 4 micro-batches, one layer a stage, the tied embedding's gradient summed over both
    stages), started from the TP=1 baseline's initial weights, gives its train and validation losses; with
    MIR the stages exchange micro-batches of twice the rows (clean and corrupted)."""
    _assert_same_losses(baselines[objective], _pp2_from_baseline_weights(baselines, tmp_path, objective))


# transformer-engine's packed sequences (THD), played by our sdpa attention on the thd layout
PACKED = ROOT / "tests" / "packed_sdpa_pretrain.py"


def _attention_of(run_dir) -> str:
    """The attention a run took, as its run.json records the start-up line's phrase."""
    return json.loads((run_dir / "run.json").read_text())["compute"]["attention"]


def test_packed_sequences_reproduce_tp1_at_tp2_sp(baselines, tmp_path):
    """Packed documents as one stream of sequences (the THD path) at TP=2 with sequence parallelism (the stream
    split over the ranks) give the dense document mask's TP=1 losses (masked diffusion)."""
    recs = run_pretrain(COMMON + OBJECTIVES["mdm+docs"] + SP2, tmp_path, nproc=2, script=PACKED)
    assert "packed sequences (THD)" in _attention_of(tmp_path)
    _assert_same_losses(baselines["mdm+docs"], recs)


def test_packed_sequences_reproduce_tp1_at_pp2(baselines, tmp_path):
    """Packed documents at PP=2: the stages exchange the packed stream ([rows * seq, 1, hidden]; MIR's clean and
    corrupted rows both in it) and reproduce the dense document mask's TP=1 losses."""
    recs = _pp2_from_baseline_weights(baselines, tmp_path, "ar+docs", script=PACKED)
    assert "packed sequences (THD)" in _attention_of(tmp_path / "pp2")
    _assert_same_losses(baselines["ar+docs"], recs)


@pytest.mark.slow  # the default suite reproduces the TP=1 curve at PP=2 (test_pipeline_parallel_reproduces_tp1)
def test_pipeline_parallel_trains(tmp_path):
    """PP=2 (1F1B over 4 micro-batches) trains: the loss falls."""
    recs = run_pretrain(COMMON + ["--objective", "mdm", "--pipeline-model-parallel-size", "2",
                                  "--train-iters", "20"], tmp_path, nproc=2)
    curve = losses(recs)
    assert len(curve) == 20
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3


def test_mir_reports_both_halves_of_its_loss(baselines):
    """With --token-dropout-aux-weight W every train record holds the clean and corrupted losses, and the loss
    is clean + W x corrupted; the corrupted inputs are harder to predict from."""
    recs = [r for r in baselines["ar+corruptions"] if r["split"] == "train"]
    assert len(recs) == TRAIN_ITERS
    for r in recs:
        assert r["loss"] == pytest.approx(r["loss_clean"] + 0.5 * r["loss_corrupted"], rel=1e-5)
    assert sum(r["loss_corrupted"] - r["loss_clean"] for r in recs) > 0


def test_document_flags_change_the_run(baselines):
    """The packed-document runs differ from the same objective without the flags (their windows hold document
    ends), so the layout tests above exercise the flags."""
    assert losses(baselines["mdm+docs"]) != losses(baselines["mdm"])
    assert losses(baselines["dual+docs"]) != losses(baselines["dual"])


def test_dual_reports_both_objectives(baselines):
    """--objective dual: each train record has the AR and diffusion halves, and validation both views (the
    record's loss is the AR NLL)."""
    train = [r for r in baselines["dual"] if r["split"] == "train"]
    assert len(train) == TRAIN_ITERS and all(r["loss_ar"] > 0 and r["loss_mdm"] > 0 for r in train)
    (valid,) = [r for r in baselines["dual"] if r["split"] == "valid"]
    assert valid["loss"] == valid["loss_ar"] and valid["loss_mdm"] > 0 and valid["loss_mdm"] != valid["loss_ar"]
