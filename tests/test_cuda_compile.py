"""Every csrc/*.cu compiles with a bare `nvcc -c` (no torch headers), and the CUDA binding builds and links
against them and this torch, so the CUDA extension cannot rot unseen on machines without a GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def cu_objects(tmp_path_factory):
    """({.cu name: compiler output} of the failed or warning builds, [object paths]): every .cu through
    nvcc -c at once, position-independent so the binding test can link the same objects."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    out_dir = tmp_path_factory.mktemp("cu_objects")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no .cu files found"
    procs = {
        src.name: subprocess.Popen(
            [NVCC, "-c", "-std=c++17", "-O2", "-arch=sm_90", "-Xcompiler", "-fPIC", f"-I{CSRC}", str(src),
             "-o", str(out_dir / f"{src.stem}.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for src in sources
    }
    failures = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 or "warning" in out.lower():
            failures[name] = out
    return failures, [out_dir / f"{src.stem}.o" for src in sources]


def test_every_cu_file_compiles(cu_objects):
    """nvcc -c succeeds for each .cu file (in parallel) with no error and no warning."""
    failures, objects = cu_objects
    assert not failures, "\n".join(f"--- {k}\n{v}" for k, v in failures.items())
    assert all(obj.stat().st_size > 0 for obj in objects)


def _cuda_library_dirs(tmp_path) -> list[str]:
    """The -L directories nvcc itself links with (found from `nvcc -dryrun`, so wrappers do not matter)."""
    empty = tmp_path / "empty.cu"
    empty.write_text("")
    out = subprocess.run([NVCC, "-dryrun", "-c", str(empty), "-o", str(tmp_path / "empty.o")],
                         capture_output=True, text=True).stderr
    line = next((ln for ln in out.splitlines() if "LIBRARIES=" in ln), "")
    return [d for d in re.findall(r'-L"?([^"\s]+)', line) if not d.endswith("stubs")]


def test_cuda_binding_builds_links_and_refuses_cpu_tensors(cu_objects, tmp_path):
    """binding_cuda.cpp (no CUDA headers, so any torch build compiles it) links with the nvcc objects and
    libcudart into a loadable module with all five ops, which refuse CPU tensors before launching."""
    import torch
    from torch.utils import cpp_extension

    failures, objects = cu_objects
    missing = [obj.name for obj in objects if not obj.exists()]
    assert not missing, f"nvcc did not build {missing}:\n" + "\n".join(failures.values())
    libs = [d for d in _cuda_library_dirs(tmp_path) if list(Path(d).glob("libcudart.so*"))]
    if not libs:
        pytest.skip("nvcc's toolkit has no shared libcudart")
    module = cpp_extension.load(
        "mde_cuda_binding_check", [str(CSRC / "binding_cuda.cpp")], extra_include_paths=[str(CSRC)],
        extra_cflags=["-O0"], build_directory=str(tmp_path),
        extra_ldflags=[*map(str, objects), f"-L{libs[0]}", "-lcudart", f"-Wl,-rpath,{libs[0]}"])
    assert {"philox4x32", "mask_tokens", "swiglu_dropout_forward", "swiglu_dropout_backward",
            "dropout_keep_mask"} <= set(dir(module))
    ids, index = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        module.mask_tokens(ids, index, 1, 2, 0, 0.5, 1e-3, 5, 0, 0, 0)
    with pytest.raises(ValueError, match="on a CUDA device"):
        module.philox4x32(torch.zeros(2, 4, dtype=torch.long), 1, 2, 0)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        module.swiglu_dropout_forward(torch.zeros(4, 6), 1, 2, 3, 4, 1 << 23, 2.0, 0, 3, 0)
