"""The GPU check cannot pass by accident: no GPU is a failure with the reason, a check that wrote no
figures fails, a missed goal fails (all checked on a CPU machine)."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def _summary(tmp_path, steps, files):
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (work / "steps.tsv").write_text("".join(f"{n}\t{rc}\t{s}\n" for n, rc, s in steps))
    for name, figures in files.items():
        (work / name).write_text(json.dumps({"figures": figures}))
    out = tmp_path / "gpu_summary.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), str(work), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(out.read_text()), proc.stdout


def test_check_scripts_exit_2_without_a_gpu(tmp_path):
    """gpu_check.sh, gpu_check.py and gpu_train_check.py stop with exit 2 and say no GPU is visible."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    sh = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                        capture_output=True, text=True, timeout=120, env=env)
    assert sh.returncode == 2 and "no GPU visible" in sh.stdout
    assert not (tmp_path / "out" / "gpu_summary.json").exists()
    for script in ("gpu_check.py", "gpu_train_check.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2 and "no GPU visible" in proc.stderr, script


def test_summary_passes_only_when_every_step_ran_and_met_its_goals(tmp_path):
    """All steps exit 0 and every judged figure passes: passed; the table lists each figure."""
    fig = {"name": "masking / copy bandwidth", "value": 0.8, "goal": ">= 0.70", "pass": True, "unit": ""}
    rc, summary, table = _summary(tmp_path, [("build", 0, 40), ("kernels", 0, 30)], {"kernels.json": [fig]})
    assert rc == 0 and summary["passed"] and "masking / copy bandwidth" in table


def test_summary_fails_on_a_missed_goal_a_failed_step_or_missing_figures(tmp_path):
    """A figure below its goal, a step with a non-zero exit, or a figure step that wrote no file fails."""
    low = {"name": "best MFU", "value": 0.3, "goal": ">= 0.45", "pass": False, "unit": ""}
    rc, summary, _ = _summary(tmp_path / "a", [("paper_model", 0, 100)], {"paper_model.json": [low]})
    assert rc == 1 and summary["failed"] == ["paper_model: best MFU"]
    rc, summary, _ = _summary(tmp_path / "b", [("build", 1, 40)], {})
    assert rc == 1 and summary["failed"] == ["step build exited 1"]
    rc, summary, _ = _summary(tmp_path / "c", [("train", 0, 100)], {})
    assert rc == 1 and summary["failed"] == ["train: wrote no train.json"]
