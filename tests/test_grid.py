"""The grid runner (tools/run_grid.py) and the plotter (tools/plot_runs.py) on a 2-method, few-step grid."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

from megatron_dataeff.experiments.grid import METHODS, PAPER_METHODS, SCALES, run_flags


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def test_grid_covers_the_paper_conditions():
    """The grid has the paper's 15 conditions (wd 0.1 is the AR baseline, so 14 runs) + 2 fresh-data
    references + 3 plain-AR budgets + 9 methods beyond the paper + 3 packed-document variants + 3 block sizes; every
    run's flags
    parse as a RunConfig; a budget run has F x the unique tokens at the baseline's number of steps."""
    from megatron_dataeff.arguments import parse_config

    assert len(PAPER_METHODS) == 14 and len(METHODS) == 35
    for method in METHODS:
        flags, facts = run_flags(SCALES["tiny"], method, 1, "/tmp/x")
        cfg = parse_config(flags)
        if method == "ar_td1.0":
            assert cfg.objective.token_dropout_schedule == "uniform" and cfg.objective.token_dropout_rate == 1.0
        if method.startswith("ar_mlp"):
            assert cfg.model.mlp_dropout == float(method[6:].split("_")[0])
        if method.endswith("_doc"):  # Megatron-LM's three document flags on the method without them
            assert cfg.data.reset_attention_mask and cfg.data.reset_position_ids and cfg.data.eod_mask_loss
            base = parse_config(run_flags(SCALES["tiny"], method[:-4], 1, "/tmp/x")[0])
            assert cfg.objective == base.objective
        if method.endswith("_fresh"):  # the same steps on unique_tokens x epochs fresh tokens
            assert cfg.data.epochs == 1 and cfg.data.unique_tokens > 19 * SCALES["tiny"].unique_tokens
        if method.startswith("ar_u"):
            assert cfg.data.unique_tokens == int(float(method[4:]) * SCALES["tiny"].unique_tokens)
            assert cfg.optim.train_iters == facts["train_iters"] == run_flags(SCALES["tiny"], "ar", 1, "/t")[1][
                "train_iters"]
    demo = SCALES["demo"]
    assert set(demo.default_methods) <= set(METHODS) and {"ar", "mdm", "dual", "ar_u2"} <= set(demo.default_methods)
    assert parse_config(run_flags(demo, "ar_mir0.3", 1, "/tmp/x")[0]).objective.token_dropout_aux_weight == 0.5
    paper = parse_config(run_flags(SCALES["paper"], "mdm", 1, "/tmp/x")[0])
    assert paper.model.num_layers == 28 and paper.optim.global_batch_size == 2048
    assert paper.model.seq_length == 4096 and paper.data.epochs == 120 and paper.data.unique_tokens == 3_000_000_000


def test_grid_runs_resumes_and_reports(tmp_path):
    """Two methods for a few steps: runs complete, a second call skips them, the plotter writes the
    table (Markdown + CSV) and PNGs."""
    out = tmp_path / "grid"
    cmd = [sys.executable, str(ROOT / "tools" / "run_grid.py"), "--scale", "tiny", "--methods", "ar,mdm",
           "--output", str(out), "--unique-tokens", "3000", "--epochs", "3", "--downstream-evals", "1",
           "--num-examples", "3", "--threads", "1",
           "--extra", "--num-layers 1 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 2 "
                      "--seq-length 32 --micro-batch-size 8 --global-batch-size 8 --eval-iters 1"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[grid] 2 of 2 runs to train: about" in first.stdout  # the estimate, printed before any training
    for m in ("ar", "mdm"):
        run = out / f"{m}_s1234"
        assert (run / "complete.json").exists()
        ds = [json.loads(x) for x in (run / "downstream.jsonl").read_text().splitlines() if x.strip()]
        assert ds and "continuation_acc" in ds[-1]
    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert second.returncode == 0 and second.stdout.count("complete, skipped") == 2
    assert "[grid] 0 of 2 runs to train" in second.stdout

    report = tmp_path / "report"
    plot = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_runs.py"), str(out), "--output", str(report)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert plot.returncode == 0, plot.stderr[-3000:]
    table = (report / "summary.md").read_text()
    assert "| ar |" in table and "| mdm |" in table and "rise after best" in table
    rows = list(csv.DictReader(open(report / "summary.csv")))
    assert {r["method"] for r in rows} == {"ar", "mdm"}
    assert all(float(r["best_val_loss"]) <= float(r["final_val_loss"]) for r in rows)
    curves = list(csv.DictReader(open(report / "curves.csv")))  # the raw curves: each run's best is among them
    for r in rows:
        valid = [float(c["loss"]) for c in curves if c["method"] == r["method"] and c["split"] == "valid"]
        assert min(valid) == pytest.approx(float(r["best_val_loss"]), abs=1e-4)
    for png in ("val_loss.png", "val_loss_vs_tokens.png", "downstream.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_quickstart_runs_the_quickstart_scale(tmp_path):
    """examples/quickstart.sh trains the quickstart scale: plain AR, AR with random-token dropout and masked
    diffusion on the demo scale's model and budget, about 3 minutes on 2 cores, keeping only each run's last
    checkpoint and scoring no offline tasks."""
    from megatron_dataeff.arguments import parse_config

    script = (ROOT / "examples" / "quickstart.sh").read_text()
    assert "python tools/run_grid.py \"${GRID_ARGS[@]}\"" in script and "(--scale quickstart " in script
    qs, demo = SCALES["quickstart"], SCALES["demo"]
    assert qs.default_methods == ["ar", "ar_td0.3_random", "mdm"] and qs.downstream_evals == 0
    assert (qs.flags, qs.unique_tokens, qs.epochs) == (demo.flags, demo.unique_tokens, demo.epochs)
    seconds = 0.0
    for method in qs.default_methods:
        flags, facts = run_flags(qs, method, 1234, "/tmp/x")
        assert parse_config(flags).optim.train_iters == facts["train_iters"] == facts["save_interval"]
        seconds += facts["train_iters"] * qs.seconds_per_step * qs.cost(method)
    assert 120 <= seconds <= 240
    dry = subprocess.run([sys.executable, str(ROOT / "tools" / "run_grid.py"), "--scale", "quickstart", "--output",
                          str(tmp_path / "qs"), "--dry-run"], capture_output=True, text=True, env=_env(), timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = dry.stdout.splitlines()
    assert len(commands) == 3 and all("pretrain_diffusion.py" in c for c in commands)  # no evaluate.py
