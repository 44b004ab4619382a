"""Package build: the pure package, plus the compiled kernels of csrc/ (see csrc/README.md).

    pip install --no-build-isolation -e .        # builds megatron_dataeff._C (and _C_cuda with CUDA)
    python setup.py build_ext --inplace          # rebuild the extension in the source tree

megatron_dataeff._C (CPU kernels) is built whenever torch is importable at build time.
megatron_dataeff._C_cuda is built when torch is a CUDA build and nvcc is found; MEGATRON_DATAEFF_CUDA=0/1
forces it off/on.  On a build machine without a visible GPU (a container build, a login node), the
CUDA architectures come from TORCH_CUDA_ARCH_LIST, or default to the data-centre GPUs this toolkit
supports (A100, H100/H200, B200 and PTX for later ones).  A failing extension build does not fail the
install: it prints a warning, and megatron_dataeff.ops falls back to the plain-torch reference (and
says so at import) -- except that with MEGATRON_DATAEFF_CUDA=1 (asked for) a failing _C_cuda fails the
build.
"""

import os
import shutil
import sys

from setuptools import setup

CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/binding.cpp", f"{CSRC}/masking_cpu.cpp", f"{CSRC}/swiglu_dropout_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/binding_cuda.cpp", f"{CSRC}/masking_cuda.cu", f"{CSRC}/swiglu_dropout_cuda.cu"]
# -ffp-contract=off: no a*b+c -> FMA, so the mask rates are bit-identical to the torch reference.
# -fno-trapping-math: lets the SwiGLU loop's selects vectorise (it changes no result).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3"]


def _warn(msg: str) -> None:
    print(f"\n*** megatron_dataeff: {msg}\n*** The plain-torch reference kernels will be used.\n",
          file=sys.stderr, flush=True)


def _cuda_required() -> bool:
    """MEGATRON_DATAEFF_CUDA=1: the CUDA extension was asked for, so its failure is an error."""
    return os.environ.get("MEGATRON_DATAEFF_CUDA", "").strip() == "1"


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("MEGATRON_DATAEFF_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return torch.version.cuda is not None and cuda_home is not None


def _default_cuda_arch_list(torch) -> "str | None":
    """TORCH_CUDA_ARCH_LIST for a build that sees no GPU (torch would otherwise fail to pick one)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return None
    major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
    if (major, minor) >= (12, 8):
        return "8.0;9.0;10.0+PTX"
    if (major, minor) >= (11, 8):
        return "8.0;9.0+PTX"
    return "8.0+PTX"


def _cuda_home_from_path() -> None:
    """Set CUDA_HOME when torch would guess it wrong: torch takes the directory above the `nvcc` on PATH,
    which is not the toolkit when that nvcc is a wrapper script or a symlink (e.g. /usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    has_toolkit = lambda d: os.path.exists(os.path.join(d, "include", "cuda_runtime.h"))  # noqa: E731
    if has_toolkit(os.path.dirname(os.path.dirname(nvcc))):
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if has_toolkit(home):
            os.environ["CUDA_HOME"] = home
            print(f"megatron_dataeff: {nvcc} is not inside a CUDA toolkit; using CUDA_HOME={home}",
                  file=sys.stderr, flush=True)
            return


def _extensions_and_cmdclass():
    try:
        import torch
        if torch.version.cuda is not None and os.environ.get("MEGATRON_DATAEFF_CUDA", "").strip() != "0":
            _cuda_home_from_path()  # before cpp_extension is imported: it reads CUDA_HOME once, at import
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any failure means: no torch, build the pure package
        _warn(f"torch is not importable at build time ({exc}); building without the C++/CUDA extension")
        return [], {}

    include = [os.path.abspath(CSRC)]
    exts = [cpp_extension.CppExtension(
        "megatron_dataeff._C", CPU_SOURCES, include_dirs=include,
        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"],
    )]
    if _want_cuda(torch, cpp_extension.CUDA_HOME):
        arch_list = _default_cuda_arch_list(torch)
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            print(f"megatron_dataeff: no GPU visible at build time; building _C_cuda for "
                  f"TORCH_CUDA_ARCH_LIST={arch_list} (set it to choose)", file=sys.stderr, flush=True)
        exts.append(cpp_extension.CUDAExtension(
            "megatron_dataeff._C_cuda", CUDA_SOURCES, include_dirs=include,
            extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
        ))

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, except that an extension that fails to build is skipped with a warning."""

        def build_extensions(self):
            self._failed = set()
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - e.g. torch's compiler / CUDA version checks
                if _cuda_required():
                    raise
                _warn(f"building the extensions failed ({type(exc).__name__}: {exc})")
                self._failed = {ext.name for ext in self.extensions}

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - compile/link errors of one extension
                if _cuda_required() and ext.name.endswith("_C_cuda"):
                    raise
                _warn(f"building {ext.name} failed ({type(exc).__name__}: {exc})")
                self._failed.add(ext.name)

        def _built_only(self, method):
            """Run a base-class method with the failed extensions left out (nothing to copy or install)."""
            failed, saved = getattr(self, "_failed", set()), self.extensions
            self.extensions = [ext for ext in saved if ext.name not in failed]
            try:
                return method()
            finally:
                self.extensions = saved

        def get_outputs(self):
            return self._built_only(super().get_outputs)

        def get_output_mapping(self):
            return self._built_only(super().get_output_mapping)

        def copy_extensions_to_source(self):
            return self._built_only(super().copy_extensions_to_source)

    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
