"""Every csrc/*.cu compiles with a bare `nvcc -c` (no torch headers), so the CUDA kernels cannot rot unseen."""

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_cu_file_compiles(tmp_path):
    """nvcc -c succeeds for each .cu file (in parallel) with no error and no warning."""
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no .cu files found"
    procs = {
        src.name: subprocess.Popen(
            [NVCC, "-c", "-std=c++17", "-O2", "-arch=sm_90", f"-I{CSRC}", str(src), "-o", str(tmp_path / f"{src.stem}.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for src in sources
    }
    failures = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 or "warning" in out.lower():
            failures[name] = out
    assert not failures, "\n".join(f"--- {k}\n{v}" for k, v in failures.items())
    assert all((tmp_path / f"{src.stem}.o").stat().st_size > 0 for src in sources)
