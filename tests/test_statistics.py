"""Grid statistics over seeds (experiments/statistics.py, experiments/report.py) on synthetic runs whose
best losses follow a known law: mean ± standard error, the paired test against plain AR, the effective-data
multiple with its interval, and plots with bands."""

import json
import math

import numpy as np
import pytest

from megatron_dataeff.experiments.report import find_runs, markdown_table, plot_runs, summarise
from megatron_dataeff.experiments.statistics import effective_data, mean_se, paired_test
from tests.conftest import ROOT

E, A, ALPHA = 2.0, 0.6, 0.5  # plain AR's best loss at F x the budget: E + A F^-alpha


def _law(f):
    return E + A * f ** -ALPHA


def _write_run(root, method, seed, best, objective="ar", block_size=None, **objective_flags):
    """A run directory whose validation curve falls to `best` at epoch 10 and rises after."""
    d = root / f"{method}_s{seed}"
    d.mkdir()
    epochs = np.arange(1, 21)
    losses = best + 0.02 * (epochs - 10) ** 2 / 10
    lines = [json.dumps({"iteration": int(10 * e), "split": "valid", "loss": float(v), "epoch": float(e),
                         "consumed_tokens": int(1000 * e)}) for e, v in zip(epochs, losses)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "run.json").write_text(json.dumps({"unique_tokens": 1000, "config": {
        "objective": {"name": objective, "block_size": block_size, **objective_flags},
        "model": {"seq_length": 128}}}))


MDM_NOISE = [0.0, 0.0, 0.0]  # the mdm runs' offsets from 2.9 (set by the fixture)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    noise = np.random.default_rng(0).normal(0, 0.004, size=(6, 3))
    MDM_NOISE[:] = noise[5]
    for k, (method, f) in enumerate({"ar_u0.5": 0.5, "ar": 1.0, "ar_u2": 2.0, "ar_u4": 4.0, "ar_td0.3": 2.5}.items()):
        for s in range(3):
            _write_run(root, method, s + 1, _law(f) + noise[k, s])
    for s in range(3):
        _write_run(root, "mdm", s + 1, 2.9 + noise[5, s], objective="mdm")
    return root


def test_mean_standard_error_and_paired_test_by_hand():
    """mean ± std/sqrt(n); the paired test is scipy's ttest_rel on the seeds both have."""
    from scipy import stats

    assert mean_se([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, np.std([1, 2, 4], ddof=1) / math.sqrt(3)))
    assert mean_se([3.0]) == (3.0, None)
    a, b = {1: 2.0, 2: 2.3, 3: 2.1, 9: 5.0}, {1: 2.1, 2: 2.35, 3: 2.3}
    delta, p, n = paired_test(a, b)
    assert n == 3 and delta == pytest.approx(np.mean([-0.1, -0.05, -0.2]))
    assert p == pytest.approx(stats.ttest_rel([2.0, 2.3, 2.1], [2.1, 2.35, 2.3]).pvalue)
    assert paired_test({1: 2.0}, {1: 2.5})[1] is None


def test_effective_data_recovers_the_multiple_of_a_known_law():
    """A method whose best loss is plain AR's at 2.5 x the budget is worth x2.5, inside its interval; fewer
    than 3 budgets or a loss below the law's floor say why instead of a number."""
    rng = np.random.default_rng(1)
    budgets = {f: list(_law(f) + rng.normal(0, 0.002, 3)) for f in (0.5, 1.0, 2.0, 4.0)}
    eff = effective_data(budgets, list(_law(2.5) + rng.normal(0, 0.002, 3)))
    assert eff.multiple == pytest.approx(2.5, rel=0.1) and eff.low <= eff.multiple <= eff.high
    assert effective_data({1.0: [2.5], 2.0: [2.4]}, [2.45]).note.startswith("needs plain AR at >= 3 budgets")
    assert effective_data(budgets, [1.0]).multiple is None


def test_summary_table_and_banded_plots(grid, tmp_path):
    """The report's rows: mean ± SE over the 3 seeds, Δ and paired p against ar (the ELBO of mdm too), the
    effective-data multiple (none for mdm), where a method first gets below AR's best; the table shows them;
    the plots are written with one band per method."""
    runs = find_runs([str(grid)])
    assert len(runs) == 18
    rows = {r["method"]: r for r in summarise(runs)}
    td = rows["ar_td0.3"]
    bests = [min(json.loads(x)["loss"] for x in (grid / f"ar_td0.3_s{s}" / "metrics.jsonl").read_text().splitlines())
             for s in (1, 2, 3)]
    assert td["seeds"] == 3 and td["best_val_loss"] == pytest.approx(np.mean(bests))
    assert td["best_val_loss_se"] == pytest.approx(np.std(bests, ddof=1) / math.sqrt(3))
    assert td["delta_vs_ar"] < -0.1 and td["p_vs_ar"] < 0.01 and td["pairs_vs_ar"] == 3
    assert td["effective_data"] == pytest.approx(2.5, rel=0.15)
    assert rows["ar"]["effective_data"] == pytest.approx(1.0, rel=0.15) and rows["ar"]["delta_vs_ar"] is None
    # the ELBO of mdm against AR's NLL (a comparison that favours AR): a Δ, no effective data
    assert rows["mdm"]["delta_vs_ar"] == pytest.approx(np.mean([2.9 + noise for noise in MDM_NOISE])
                                                       - rows["ar"]["best_val_loss"])
    assert "effective_data" not in rows["mdm"]
    # where each seed first gets to plain AR's best of the same seed: ar_td0.3 (best below) at epoch <= 10, mdm
    # (above) never
    assert rows["ar_td0.3"]["crossed"] == 3 and rows["ar_td0.3"]["cross_epoch"] <= 10
    assert rows["mdm"]["crossed"] == 0 and rows["mdm"]["cross_tried"] == 3
    assert rows["ar_u2"]["cross_tried"] == 0  # plain AR at another budget is not asked
    table = markdown_table(list(rows.values()))
    assert "| ar_td0.3 | 3 |" in table and "(p=" in table and "x2." in table
    assert "no (3/3 seeds stay above)" in table and "below AR's best at" in table
    written = plot_runs(runs, str(tmp_path / "report"))
    assert all(p.endswith(".png") for p in written) and len(written) == 2


def test_block_sizes_get_their_plot(grid, tmp_path):
    """Block-diffusion runs are grouped by their --block-size and plotted (best loss against block size) beside
    AR's and mdm's best (runs on a clipped schedule are another method, left out); a grid without them gets no
    such plot."""
    from megatron_dataeff.experiments.report import block_sizes

    root = tmp_path / "blocks"
    root.mkdir()
    for size, best in ((4, 2.6), (16, 2.75), (128, 2.9)):
        for s in (1, 2):
            _write_run(root, f"block{size}", s, best + 0.01 * s, objective="block", block_size=size)
    for s in (1, 2):
        _write_run(root, "ar", s, 2.5 + 0.01 * s)
        _write_run(root, "block4_clip", s, 2.0, objective="block", block_size=4, mdm_t_min=0.3, mdm_t_max=0.8)
    runs = find_runs([str(root)])
    assert list(block_sizes(runs)) == [4, 16, 128] and all(len(v) == 2 for v in block_sizes(runs).values())
    written = plot_runs(runs, str(tmp_path / "report"))
    assert any(p.endswith("block_size.png") for p in written)
    assert not any(p.endswith("block_size.png") for p in plot_runs(find_runs([str(grid)]), str(tmp_path / "r2")))


def test_curves_csv_stands_for_its_runs(grid, tmp_path):
    """A report's curves.csv (+ runs.csv) reads back as the same runs: the same summary rows; a run directory
    replaces an archived run of the same method and seed; a damaged file is refused naming it and the line."""
    from megatron_dataeff.errors import DataError
    from megatron_dataeff.experiments.report import runs_csv_path, write_curves_csv

    runs = find_runs([str(grid)])
    runs[0].downstream = [{"epoch": 20.0, "cloze_acc": 0.25}]
    curves = tmp_path / "g_curves.csv"
    write_curves_csv(runs, str(curves))
    back = find_runs([str(curves)])
    key = lambda r: (r.method, r.seed)  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, runs))
    for a, b in zip(sorted(runs, key=key), sorted(back, key=key)):
        assert (a.valid, a.train, a.objective, a.unique_tokens, a.downstream) == \
               (b.valid, b.train, b.objective, b.unique_tokens, b.downstream)
    assert summarise(back) == summarise(runs)

    again = tmp_path / "again"
    again.mkdir()
    _write_run(again, "ar", 2, 1.0)  # a re-run of ar seed 2 with another curve
    merged = find_runs([str(curves), str(again)])
    assert len(merged) == len(runs)
    assert min(v[2] for v in next(r for r in merged if key(r) == ("ar", 2)).valid) == pytest.approx(1.0)

    lines = curves.read_text().splitlines()
    lines[5] = lines[5].replace("valid", "val", 1)
    curves.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"g_curves.csv:6: split 'val'"):
        find_runs([str(curves)])
    (tmp_path / "g_runs.csv").unlink()
    assert runs_csv_path(str(curves)).endswith("g_runs.csv")
    with pytest.raises(DataError, match=r"g_curves.csv: no g_runs.csv beside it"):
        find_runs([str(curves)])


def test_named_places_sit_beside_a_method_and_methods_filter(grid, tmp_path, capsys):
    """NAME=PATH reports one method's runs under another name, beside (not replacing) that method's runs, from a
    run/grid directory or a curves.csv; tools/plot_runs.py --methods keeps the methods named and refuses an
    unknown one by name."""
    import runpy

    from megatron_dataeff.errors import DataError
    from megatron_dataeff.experiments.report import write_curves_csv

    long_grid = tmp_path / "long"
    long_grid.mkdir()
    _write_run(long_grid, "mdm", 1, 2.5, objective="mdm")  # the same method and seed, trained longer
    runs = find_runs([str(grid), f"mdm_480ep={long_grid}"])
    by = {(r.method, r.seed): r for r in runs}
    assert ("mdm_480ep", 1) in by and ("mdm", 1) in by and len(runs) == 19
    assert min(v[2] for v in by[("mdm_480ep", 1)].valid) == pytest.approx(2.5)
    assert min(v[2] for v in by[("mdm", 1)].valid) == pytest.approx(2.9 + MDM_NOISE[0])
    assert by[("mdm_480ep", 1)].objective == "mdm"

    curves = tmp_path / "l_curves.csv"
    write_curves_csv(find_runs([str(long_grid)]), str(curves))
    assert {(r.method, r.seed) for r in find_runs([f"mdm_long={curves}"])} == {("mdm_long", 1)}
    with pytest.raises(DataError, match=r"holds the runs of 6 methods"):
        find_runs([f"x={grid}"])
    with pytest.raises(DataError, match=r"no such grid, run directory or curves.csv: .*nowhere"):
        find_runs([f"x={tmp_path / 'nowhere'}"])

    plot_runs_main = runpy.run_path(str(ROOT / "tools" / "plot_runs.py"))["main"]
    out = tmp_path / "report"
    assert plot_runs_main([str(grid), f"mdm_480ep={long_grid}", "--methods", "ar,mdm_480ep",
                           "--output", str(out), "--prefix", "p_"]) == 0
    table = (out / "p_summary.md").read_text()
    assert "| mdm_480ep |" in table and "| ar |" in table and "| ar_td0.3 |" not in table
    capsys.readouterr()
    assert plot_runs_main([str(grid), "--methods", "ar,nope", "--output", str(out)]) == 2  # bad input: one line
    assert "--methods ar,nope: no runs of nope" in capsys.readouterr().err


def test_a_longer_run_keeps_its_family_colour_in_another_line():
    from megatron_dataeff.experiments.report import _style

    assert _style("mdm_480ep")["color"] == _style("mdm")["color"]
    assert _style("mdm_480ep")["linestyle"] not in (_style("mdm")["linestyle"], _style("mdm_fresh")["linestyle"])
    assert _style("ar_td1.0_240ep")["alpha"] == _style("ar_td1.0")["alpha"]
