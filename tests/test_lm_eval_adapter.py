"""The lm-evaluation-harness adapter: its methods on fake requests, and an end-to-end local task run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_dataeff.evaluation.lm_eval_adapter import LM_EVAL_AVAILABLE, MegatronDataEffLM
from tests.conftest import ROOT, run_pretrain
from tests.test_evaluation import (CountingBidirectional, CountingModel, FixedDistribution, LeftToRightBidirectional,
                                  _scorer)


def _req(*args):
    return SimpleNamespace(args=args)


@pytest.mark.parametrize("diffusion", [False, True])
def test_loglikelihood_and_generate_on_certain_model(diffusion):
    """loglikelihood gives (logprob, is_greedy); the certain continuation is greedy, others are not;
    generate_until continues the pattern and stops at the stop string."""
    sc = _scorer(CountingBidirectional() if diffusion else CountingModel(), diffusion)
    lm = MegatronDataEffLM(scorer=sc, mc_samples=4)
    res = lm.loglikelihood([_req("abcd", "efgh"), _req("abcd", "efgX"), _req("abcd ", "xyz")])
    assert res[0][1] is True and res[1][1] is False and res[2][1] is False
    assert res[0][0] > res[1][0] and res[0][0] > -1e-3
    gen = lm.generate_until([_req("abcd", {"until": ["i"], "max_gen_toks": 6}),
                             _req("KLMN", {"until": [], "max_gen_toks": 3})])
    assert gen == ["efgh", "OPQ"]


def test_loglikelihood_greedy_order_model_arg():
    """model_args greedy_order=l2r makes is_greedy decode left to right (default: most confident
    first); an unknown order is refused when the model is built."""
    sc = _scorer(LeftToRightBidirectional(), diffusion=True)
    reqs = [_req("abc", "defg"), _req("abc", "defq")]
    assert [g for _, g in MegatronDataEffLM(scorer=sc, method="exact").loglikelihood(reqs)] == [False, True]
    lm = MegatronDataEffLM(scorer=sc, method="exact", greedy_order="l2r")
    assert [g for _, g in lm.loglikelihood(reqs)] == [True, False]
    with pytest.raises(ValueError, match="greedy_order"):
        MegatronDataEffLM(scorer=sc, greedy_order="random")


def test_loglikelihood_rolling_ar_counts_every_token_once():
    """AR rolling log-likelihood over several windows equals the exact sum for a context-free model."""
    model = FixedDistribution(seed=1)
    sc = _scorer(model, diffusion=False, max_length=16)
    lm = MegatronDataEffLM(scorer=sc)
    text = "A string much longer than the sixteen-token window of this model."
    got = lm.loglikelihood_rolling([_req(text)])[0]
    assert got == pytest.approx(model.log_q(list(text.encode())), abs=1e-4)
    sc_d = _scorer(model, diffusion=True, max_length=16)
    val = MegatronDataEffLM(scorer=sc_d, mc_samples=4).loglikelihood_rolling([_req(text)])[0]
    assert val < 0 and torch.isfinite(torch.tensor(val))


@pytest.mark.skipif(not LM_EVAL_AVAILABLE, reason="lm-evaluation-harness is not installed "
                                                  "(pip install 'lm_eval>=0.4,<0.5'); adapter tested directly above")
def test_lm_eval_end_to_end_on_local_tasks(tmp_path):
    """`tools/run_lm_eval.py --model megatron_dataeff` runs local multiple-choice, perplexity and
    generation tasks (tests/assets/lm_eval, no download) on a tiny diffusion checkpoint."""
    run = tmp_path / "run"
    run_pretrain(["--objective", "mdm", "--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
                  "--num-attention-heads", "2", "--seq-length", "64", "--micro-batch-size", "4",
                  "--train-iters", "4", "--eval-iters", "0", "--save", str(run / "ckpt"),
                  "--tensorboard-dir", ""], run)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    out_dir = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "run_lm_eval.py"), "--model", "megatron_dataeff",
                           "--model_args", f"load={run / 'ckpt'},mc_samples=2",
                           "--tasks", "dataeff_tiny_choice,dataeff_tiny_rolling,dataeff_tiny_generate",
                           "--include_path", str(ROOT / "tests" / "assets" / "lm_eval"),
                           "--output_path", str(out_dir)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out_dir.rglob("results_*.json"))
    assert files
    results = json.loads(files[0].read_text())["results"]
    assert 0.0 <= results["dataeff_tiny_choice"]["acc,none"] <= 1.0
    assert results["dataeff_tiny_rolling"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in results["dataeff_tiny_generate"]


def test_ar_generation_with_kv_cache_equals_full_recompute(tmp_path):
    """On a real AR checkpoint, generate() decodes through the KV cache and gives the text of the
    full-recompute path, greedy and sampled."""
    run = tmp_path / "run"
    run_pretrain(["--objective", "ar", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                  "--num-attention-heads", "2", "--seq-length", "64", "--micro-batch-size", "4",
                  "--train-iters", "3", "--eval-iters", "0", "--save", str(run / "ckpt"),
                  "--tensorboard-dir", ""], run)
    script = f"""
import json
from megatron_dataeff.evaluation.lm_eval_adapter import MegatronDataEffLM
from megatron_dataeff.distributed import owned_process_group
with owned_process_group():
    lm = MegatronDataEffLM(load={str(run / 'ckpt')!r})
    assert lm._cached_logits_fn(64) is not lm.scorer.logits_fn, "the KV cache path is not taken"
    cached = [lm.generate("def f(x):", 24, t) for t in (0.0, 1.0)]
    lm._cached_logits_fn = lambda n: lm.scorer.logits_fn
    plain = [lm.generate("def f(x):", 24, t) for t in (0.0, 1.0)]
print(json.dumps([cached, plain]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cached, plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cached == plain and all(cached)


@pytest.mark.skipif(not LM_EVAL_AVAILABLE, reason="lm-evaluation-harness is not installed")
def test_stock_hf_model_on_the_export_agrees_with_our_adapter(megatron_cpu, tmp_path, monkeypatch):
    """lm-eval's stock `hf` model on an AR checkpoint's HF export and our adapter on the checkpoint give the same
    per-example log-likelihoods and greedy flags (and rolling log-likelihoods) on a byte-level model."""
    from lm_eval.models.huggingface import HFLM

    from megatron_dataeff.export.hf_export import export_checkpoint
    from tests.conftest import train_in_process

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train_in_process(["--objective", "ar", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                      "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
                      "--micro-batch-size", "4", "--train-iters", "20", "--lr-decay-iters", "20", "--eval-iters", "0",
                      "--save", str(tmp_path / "ckpt")], tmp_path / "run")
    hf_dir = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="fp32")
    requests = [_req("The quick brown fox", " jumps over the lazy dog"), _req("data", " is scarce"),
                _req("Once upon a time ", "there"), _req("a", "b"), _req("naïve 東京", " ✓")]
    rolling = [_req("A whole document to score, long enough to need more than one sixty-four-token window here.")]
    ours = MegatronDataEffLM(load=str(tmp_path / "ckpt"))
    stock = HFLM(pretrained=hf_dir, backend="causal", device="cpu", dtype="float32", batch_size=1,
                 max_length=64)
    mine, theirs = ours.loglikelihood(requests), stock.loglikelihood(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert len({round(a, 3) for a, _ in mine}) == len(requests)  # distinct values: a real comparison
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        stock.loglikelihood_rolling(rolling, disable_tqdm=True)[0], abs=1e-3)
