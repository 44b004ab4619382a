"""Shared fixtures: a session-wide corpus cache, a 1-process megatron set-up, a torchrun helper."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_dataeff.ops import extension

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


# The tests that CI also runs on the oldest megatron-core supported (tests/run.sh's oldest leg; the newest leg runs
# the whole suite): those that exercise megatron-core API which changed across the supported range.  What changed
# from 0.16 to 0.19: checkpoint storage (common.pt, asynchronous save strategies, DCP's errors), the optimizer and
# DDP (grad sync on streams, param groups), parallel state and process groups, layer specs and TransformerConfig
# fields, attention backends, inference paths (KV cache), and the API checked by scripts/check_megatron_api.py.
# Data, tokenizers, objectives, kernels and tools use megatron-core only through these, or not at all.  A file
# name takes the whole file; "file::test" one test (all its parameters), "file::test[param]" one case: where a test
# is repeated per objective, one case per parallel layout is enough for the API (the objectives run on the newest
# leg).
MEGATRON_RANGE_TESTS = (
    "test_megatron_api.py",           # our imports, attributes and calls against the installed release
    "test_deferred_compile.py",       # megatron-core's compiled functions (which modules, which decorators)
    # a failed background writer's error reaches rank 0 as each release words it (0.16: the errno; 0.19: the type)
    "test_checkpoint_integrity.py::test_a_full_file_system_under_a_background_save_stops_the_run_with_one_line",
    "test_async_save.py",             # the async-save writer each release has; megatron-core's notices
    # a checkpoint's optimizer parameter groups are found by their learning rates from 0.19
    "test_schedule_resume.py::test_override_with_new_learning_rates_follows_them",
    "test_checkpoint_layouts.py",     # distributed optimizer state resharded across TP / PP / DP
    "test_megatron_lm_checkpoints.py",  # Megatron-LM's checkpoints read and written (common state)
    "test_model_family.py",           # TransformerConfig fields and defaults the family relies on
    "test_attention_backends.py",     # which attention is built per backend, layer specs
    "test_generate.py",               # KV-cache inference paths (megatron-core 0.18 changed them)
    # save / resume, async save, refusals (one exact resume per optimizer kind; resharding: TP, and the file above)
    *(f"test_checkpointing.py::{t}" for t in (
        "test_async_save_resumes_exactly", "test_kill_during_save_leaves_previous_checkpoint_loadable",
        "test_checkpoint_without_common_pt_is_refused_by_older_megatron", "test_load_without_checkpoint_is_an_error",
        "test_missing_shard_and_metadata_are_refused", "test_truncated_shard_is_refused",
        "test_other_shape_is_refused_naming_the_flag", "test_keep_last_prunes_old_checkpoints",
        "test_tp2_checkpoint_resumes_at_tp1", "test_exact_resume_with_dropout[ar-distributed-optimizer]",
        "test_exact_resume_with_dropout[mdm-bf16]")),
    # TP=2, TP=2 with SP, DP=2, the vocab-parallel loss, sdpa under TP and PP=2 on gloo, each against TP=1
    *(f"test_distributed.py::{t}" for t in (
        "test_two_process_layout_reproduces_tp1[ar-tp2]", "test_two_process_layout_reproduces_tp1[ar-tp2-sp]",
        "test_two_process_layout_reproduces_tp1[ar-dp2]", "test_two_process_layout_reproduces_tp1[ar-tp2-chunked-loss]",
        "test_two_process_layout_reproduces_tp1[mdm-sdpa-tp2-vs-unfused-tp1]",
        "test_pipeline_parallel_reproduces_tp1[mdm]")),
    "test_training.py::test_nonfinite_loss_stops_naming_the_step",  # megatron-core's found-inf / NaN checks
    # packed sequences go through megatron-core's thd code (attention's layout, rotary positions per sequence)
    "test_documents.py::test_packed_sequences_equal_the_document_mask",
    "test_documents.py::test_trainer_on_packed_sequences_follows_the_document_mask",
)


def _in_megatron_range_tests(item) -> bool:
    test = f"{item.path.name}::{item.name}"
    return any(entry in (item.path.name, test, test.split("[")[0]) for entry in MEGATRON_RANGE_TESTS)


def pytest_collection_modifyitems(config, items):
    """On the oldest leg (MEGATRON_DATAEFF_TEST_LEG=oldest, set by tests/run.sh) keep MEGATRON_RANGE_TESTS only."""
    if os.environ.get("MEGATRON_DATAEFF_TEST_LEG") != "oldest":
        return
    keep = [item for item in items if _in_megatron_range_tests(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _in_megatron_range_tests(item)])
    items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """Every test (and every process it launches) shares one embedded-corpus cache."""
    path = os.environ.get("MEGATRON_DATAEFF_TEST_CACHE") or str(tmp_path_factory.mktemp("corpus_cache"))
    os.environ["MEGATRON_DATAEFF_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def megatron_cpu():
    """torch.distributed (1 gloo process) and megatron's parallel state at TP=PP=1, in this process."""
    from megatron_dataeff.distributed import initialize

    return initialize(1, 1, seed=1234, device_flag="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """The environment of a child process of a test: without torch.distributed's variables (the in-process
    fixture sets them; a child must not inherit them), with this checkout importable, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def worker_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` training into run_dir (read from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"pretrain_diffusion.py" in b" ".join(cmdline) and b"torch.distributed.run" not in b" ".join(cmdline):
            return int(entry)
    return None


def train_iterations(run_dir: Path) -> int:
    """How many train records the run in run_dir has logged so far (its metrics.jsonl, read while it trains)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}") and '"train"' in line)


def run_pretrain(args: list[str], run_dir: Path, nproc: int = 1, timeout: int = 600,
                 script: Path = ROOT / "pretrain_diffusion.py") -> list[dict]:
    """Run pretrain_diffusion.py (or `script`, which runs it) under torchrun when nproc > 1; return its
    metrics.jsonl records."""
    env = child_env()
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd += [str(script), *args, "--run-dir", str(run_dir), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(records: list[dict], split: str = "train") -> list[float]:
    """The loss of each record of a split, in order."""
    return [r["loss"] for r in records if r["split"] == split]


# Kernel tests (masking, SwiGLU dropout): the devices each case runs on, and the implementation it must get.
KERNEL = {"cpu": "cpp", "cuda": "cuda"}  # the implementation each device's kernel test must run


def _cuda_skip_reason() -> str | None:
    """Why the CUDA cases cannot run here: no GPU, or _C_cuda not built (it needs nvcc; a build that is
    there but fails to load is not a reason: the test then fails, naming the load error)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    if isinstance(extension.load_error("cuda"), ModuleNotFoundError):
        return f"megatron_dataeff._C_cuda is not built ({extension.load_error('cuda')})"
    return None


# CPU never skips: `pip install -e .` builds _C, so without it the kernel tests fail instead of comparing
# the torch reference with itself.
KERNEL_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(_cuda_skip_reason() is not None,
                                                                       reason=str(_cuda_skip_reason())))]


def train_in_process(argv: list[str], run_dir: Path) -> list[dict]:
    """Train with pretrain_diffusion.py's flags in this process (1 process, CPU; megatron_cpu must be set
    up); its metrics.jsonl records.  Several runs may follow each other in one process."""
    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.training.loop import Trainer

    cfg = config_from_args(build_parser().parse_args(
        list(argv) + ["--run-dir", str(run_dir), "--device", "cpu", "--tensorboard-dir", ""]))
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
