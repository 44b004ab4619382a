"""One summary of a GPU check run: every figure with its goal and pass/fail, and every step's exit status.

    python benchmarks/gpu_summary.py WORK_DIR --out OUT/gpu_summary.json     # called by gpu_check.sh

Reads WORK_DIR/steps.tsv (name, exit status, seconds per step, written by gpu_check.sh) and the figure
files the steps wrote (WORK_DIR/*.json with a "figures" list of {name, value, goal, pass}); prints a
markdown table and writes the JSON.  Exits 1 when a step failed or a judged figure missed its goal, or
when a step that should have written figures wrote none (a check that did not run cannot pass).
"""

import argparse
import json
import sys
from pathlib import Path

# step name -> the figures file it must leave behind
FIGURE_FILES = {"kernels": "kernels.json", "train": "train.json", "paper_model": "paper_model.json"}


def summarise(work: Path) -> dict:
    steps = []
    steps_file = work / "steps.tsv"
    if steps_file.exists():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            steps.append({"name": name, "exit": int(rc), "seconds": int(seconds)})
    figures, missing = [], []
    for step in steps:
        expected = FIGURE_FILES.get(step["name"])
        if expected is None:
            continue
        path = work / expected
        if not path.exists():
            missing.append(f"{step['name']}: wrote no {expected}")
            continue
        data = json.loads(path.read_text())
        for fig in data.get("figures", []):
            figures.append({"step": step["name"], **fig})
    failed = [f"step {s['name']} exited {s['exit']}" for s in steps if s["exit"] != 0]
    failed += [f"{f['step']}: {f['name']}" for f in figures if f.get("pass") is False]
    failed += missing
    return {"steps": steps, "figures": figures, "failed": failed, "passed": bool(steps) and not failed}


def markdown(summary: dict) -> str:
    rows = ["| step | figure | value | goal | result |", "|---|---|---|---|---|"]
    for f in summary["figures"]:
        value = f["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        result = "" if f.get("pass") is None else ("pass" if f["pass"] else "**FAIL**")
        rows.append(f"| {f['step']} | {f['name']} | {shown} {f.get('unit') or ''} | {f.get('goal') or ''} | {result} |")
    steps = ", ".join(f"{s['name']} {'ok' if s['exit'] == 0 else 'exit ' + str(s['exit'])} ({s['seconds']} s)"
                      for s in summary["steps"])
    return "\n".join(rows) + f"\n\nsteps: {steps}\n" + ("all passed" if summary["passed"] else
                                                          "FAILED: " + "; ".join(summary["failed"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    summary = summarise(args.work)
    for name in ("machine.txt",):
        path = args.work / name
        if path.exists():
            summary[name.split(".")[0]] = path.read_text()[-2000:]
    args.out.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
