"""The memory estimate (`training/memory.py`, `tools/estimate_memory.py`) against what really happens on CPUs:
parameter counts of built models, the gradient buffer and optimizer state megatron allocates, the bytes
autograd saves for backward (unique storages), the peak of live tensors in a forward-backward, the peak
RSS of real training runs (each in a process forked from one that imported the trainer, with
MALLOC_MMAP_THRESHOLD_ so that freed blocks leave the RSS), and, marked slow, two-process TP / SP / PP."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD_TAG = "MEMORY_CHILD "


def _cfg(*argv, world_size: int = 1):
    from megatron_dataeff.arguments import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--device", "cpu", *argv]))
    cfg.validate_layout(world_size)
    return cfg


SMALL = ["--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "160", "--num-attention-heads", "4",
         "--seq-length", "40", "--micro-batch-size", "2"]
IDS = 300  # ids of the test models: padded to 384 rows


# ----------------------------------------------------------------------------------------------
# mirrors of package facts the estimate keeps torch-free


def test_estimate_imports_no_torch():
    """The estimate (and the tool) read the package's own attention table and loss chunking without
    importing torch, so a login node answers at once."""
    import subprocess
    import sys

    code = ("import sys; import megatron_dataeff.training.memory, megatron_dataeff.models.attention_backends; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------------------------
# parameters, gradient buffer, optimizer state


@pytest.mark.parametrize("flags", [
    [], ["--untie-embeddings-and-output-weights"], ["--qk-layernorm"], ["--num-query-groups", "1"],
    ["--num-query-groups", "2", "--qk-layernorm", "--kv-channels", "24"],
    ["--bf16", "--untie-embeddings-and-output-weights"],
], ids=["tied", "untied", "qk_ln", "mqa", "gqa_qk_ln_kv24", "bf16_untied"])
def test_parameter_count_and_bytes_equal_the_built_model(megatron_cpu, flags):
    """Parameters per rank (TP=PP=1) equal count_parameters(build_model(...)), and their bytes (matrices in
    the parameter dtype, RMSNorm weights in fp32) equal the built tensors'."""
    from megatron_dataeff.models.builder import build_model, count_parameters
    from megatron_dataeff.training.memory import estimate_memory, parameter_counts

    cfg = _cfg(*SMALL, *flags)
    model = build_model(cfg, IDS, "cpu")
    matrices, norms = parameter_counts(cfg, IDS)
    assert matrices + norms == count_parameters(model)
    est = estimate_memory(cfg, 1, IDS, "cpu")
    assert est.parameters == sum(p.numel() * p.element_size() for p in model.parameters())


def _tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t.dim() > 0:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("flags", [[], ["--bf16"], ["--use-distributed-optimizer"],
                                   ["--bf16", "--use-distributed-optimizer"], ["--bf16", "--grad-reduce-in-bf16"]],
                         ids=["fp32", "bf16", "fp32_distopt", "bf16_distopt", "bf16_grad_bf16"])
def test_gradient_buffer_and_optimizer_state_equal_megatrons(megatron_cpu, flags):
    """megatron DDP's gradient buffer and the megatron optimizer's state after a step (Adam moments, fp32
    masters) take the estimated bytes (to megatron's padding of buffers: 1%)."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_dataeff.models.builder import build_model
    from megatron_dataeff.training.memory import estimate_memory
    from megatron_dataeff.training.optimizer import build_optimizer

    cfg = _cfg(*SMALL, "--hidden-size", "128", "--ffn-hidden-size", "256", *flags)
    model = build_model(cfg, 2000, "cpu")
    p = cfg.parallel
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=not p.grad_reduce_in_bf16, use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False))
    opt = build_optimizer(cfg, [ddp])
    x = torch.randint(0, 2000, (2, 40))
    ddp.zero_grad_buffer()
    ddp(x, torch.arange(40).expand(2, -1), None, labels=x).float().mean().backward()
    finalize_model_grads([ddp])
    opt.step()
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for b in list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", [])))
    model_params = {q.data_ptr() for q in model.parameters()}
    inner = opt.optimizer
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    masters = [q for g in inner.param_groups for q in g["params"] if q.data_ptr() not in model_params]
    if p.use_distributed_optimizer:  # fp32 shards are views of the params themselves, not masters
        buffer_ptrs = [(b.param_data.data_ptr(), b.param_data.numel() * b.param_data.element_size())
                       for b in ddp.buffers if b.param_data is not None]
        masters = [q for q in masters if not any(lo <= q.data_ptr() < lo + n for lo, n in buffer_ptrs)]
    est = estimate_memory(cfg, 1, 2000, "cpu")
    assert grads == pytest.approx(est.gradients, rel=0.01)
    assert _tensor_bytes(state + masters) == pytest.approx(est.optimizer_state, rel=0.01)


# ----------------------------------------------------------------------------------------------
# what autograd saves for backward


def _saved_storages(model, b: int, s: int, attention_mask=None):
    """{storage pointer: (module that saved it first, bytes)} of one training forward (parameters left out)."""
    import torch

    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    stack, hooks = [], []
    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda m, args, n=name: stack.append(n)))
        hooks.append(mod.register_forward_hook(lambda m, args, out: (stack.pop(), None)[1]))
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), (stack[-1] if stack else "", st.nbytes()))
        return t

    x = torch.randint(0, IDS, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, torch.arange(s).expand(b, -1), attention_mask, labels=x)
    loss.float().sum().backward()
    for h in hooks:
        h.remove()
    return seen


RECOMPUTE = {
    "none": [],
    "full_uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "full_block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
    "selective": ["--recompute-granularity", "selective"],
    "selective_mlp": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
    "mlp_only": ["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
}
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--mlp-dropout", "0.1"]
SAVED_CASES = [
    (backend, dtype, dropout, extra, recompute)
    for backend in ("sdpa", "local") for dtype in ("fp32", "bf16") for dropout in (False, True)
    for extra, recompute in (("gqa", "none"), ("mha_qk_ln", "none"), ("mqa_mdm", "none"), ("gqa", "full_uniform"),
                             ("gqa", "full_block"), ("gqa", "selective"), ("gqa", "selective_mlp"), ("gqa", "mlp_only"))
]
EXTRA = {"gqa": ["--num-query-groups", "2"], "mha_qk_ln": ["--qk-layernorm"],
         "mqa_mdm": ["--num-query-groups", "1", "--objective", "mdm"]}


@pytest.mark.parametrize("backend, dtype, dropout, extra, recompute", SAVED_CASES,
                         ids=["-".join([a, b, "drop" if c else "nodrop", d, e]) for a, b, c, d, e in SAVED_CASES])
def test_saved_activations_equal_autograds(megatron_cpu, backend, dtype, dropout, extra, recompute):
    """What one transformer layer saves for backward, and everything a forward saves (embedding, layers,
    head, loss), equal the estimate to 1% (unique storages, by saved-tensor hooks)."""
    from megatron_dataeff.models.builder import build_model
    from megatron_dataeff.training.memory import estimate_memory

    flags = ["--attention-backend", backend, *EXTRA[extra], *RECOMPUTE[recompute],
             *(["--bf16"] if dtype == "bf16" else []), *(DROPOUT if dropout else [])]
    cfg = _cfg(*SMALL, "--num-layers", "4", *flags)
    saved = _saved_storages(build_model(cfg, IDS, "cpu").train(), 2, 40)
    est = estimate_memory(cfg, 1, IDS, "cpu")
    total = sum(n for _, n in saved.values())
    assert total == pytest.approx(est.activations + est.loss, rel=0.01)
    if not recompute.startswith("full"):
        layer = sum(n for name, n in saved.values() if name.split(".")[:3] == ["decoder", "layers", "1"])
        assert layer == pytest.approx(sum(est.per_layer.values()), rel=0.01)


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", ["ar", "dual"])
def test_saved_activations_with_a_dense_row_mask(megatron_cpu, backend, dtype, objective):
    """Packed documents (--reset-attention-mask) and the dual objective give each row its own [b, 1, s, s] mask
    under sdpa and local attention: what a forward saves, and one layer's part, equal the estimate (sdpa keeps
    a copy of the mask in the dtype per layer, local the one bool mask; without the term this fails)."""
    import torch

    from megatron_dataeff.models.builder import build_model
    from megatron_dataeff.training.memory import estimate_memory

    cfg = _cfg(*SMALL, "--num-layers", "4", "--attention-backend", backend, "--reset-attention-mask",
               "--objective", objective, *(["--bf16"] if dtype == "bf16" else []))
    b, s = 2, 40
    docs = torch.randint(0, 3, (b, s)).sort(dim=1).values  # three packed documents a row
    q, kv = torch.arange(s)[:, None], torch.arange(s)[None, :]
    mask = (docs[:, None, :, None] != docs[:, None, None, :]) | (kv > q)  # True = masked out
    saved = _saved_storages(build_model(cfg, IDS, "cpu").train(), b, s, attention_mask=mask)
    est = estimate_memory(cfg, 1, IDS, "cpu")
    total = sum(n for _, n in saved.values())
    # the estimate counts the mask the batch holds; sdpa does not save the bool mask itself
    held = b * s * s if backend == "sdpa" else 0
    assert total + held == pytest.approx(est.activations + est.loss, rel=0.01)
    layer = sum(n for name, n in saved.values() if name.split(".")[:3] == ["decoder", "layers", "1"])
    assert layer == pytest.approx(sum(est.per_layer.values()), rel=0.01)


@pytest.mark.parametrize("dtype, p", [("fp32", 0.0), ("bf16", 0.0), ("fp32", 0.2), ("bf16", 0.2)])
def test_unfused_attention_bytes_are_the_saved_score_tensors(megatron_cpu, dtype, p):
    """`unfused_attention_bytes` equals the [b, heads, s, s] tensors megatron's local attention saves per
    layer (CPU: dropout masks in the dtype)."""
    import torch

    from megatron_dataeff.models.builder import build_model
    from megatron_dataeff.training.memory import unfused_attention_bytes

    b, s, heads = 2, 40, 4
    cfg = _cfg(*SMALL, "--attention-backend", "local", "--attention-dropout", str(p),
               *(["--bf16"] if dtype == "bf16" else []))
    model = build_model(cfg, IDS, "cpu").train()
    found = {}

    def pack(t):
        if t.dim() >= 3 and t.shape[-2:] == (s, s) and t.numel() == b * heads * s * s:
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, IDS, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.arange(s).expand(b, -1), None, labels=x)
    per_layer = sum(found.values()) / cfg.model.num_layers
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert per_layer == unfused_attention_bytes(b, heads, s, torch_dtype, p, device="cpu")


# ----------------------------------------------------------------------------------------------
# the peak of a forward-backward, counted at the allocator (live tensor storages)


def _live_peak(model, b: int, s: int) -> int:
    """Peak bytes of tensor storages allocated during a training forward + backward and alive at once."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.sizes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st.data_ptr() and st.data_ptr() not in self.sizes:
                        self.sizes[st.data_ptr()] = st.nbytes()
                        self.live += st.nbytes()
                        weakref.finalize(st, self._free, st.data_ptr())
            self.peak = max(self.peak, self.live)
            return out

        def _free(self, ptr):
            self.live -= self.sizes.pop(ptr, 0)

    x = torch.randint(0, 1024, (b, s))
    mode = Live()
    with mode:
        model(x, torch.arange(s).expand(b, -1), None, labels=x).float().sum().backward()
    return mode.peak


PEAK_CASES = ["sdpa", "sdpa-bf16", "local", "local-bf16", "local-mdm", "sdpa-drop", "local-drop-bf16",
              "sdpa-full", "local-selective", "local-block"]
PEAK_FLAGS = {"bf16": ["--bf16"], "mdm": ["--objective", "mdm"], "drop": DROPOUT, "full": RECOMPUTE["full_uniform"],
              "selective": RECOMPUTE["selective"], "block": RECOMPUTE["full_block"]}


@pytest.mark.parametrize("case", PEAK_CASES)
def test_backward_peak_equals_live_tensor_peak(megatron_cpu, case):
    """The estimated peak of a forward-backward beyond the persistent state (saved tensors + the largest
    transient) is within 6% of the peak of live tensor storages counted at dispatch."""
    from megatron_dataeff.models.builder import build_model
    from megatron_dataeff.training.memory import estimate_memory

    backend, *mods = case.split("-")
    flags = ["--attention-backend", backend, *[f for m in mods for f in PEAK_FLAGS[m]]]
    b, s = 4, 256
    cfg = _cfg("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "8",
               "--num-query-groups", "4", "--seq-length", str(s), "--micro-batch-size", str(b), *flags)
    model = build_model(cfg, 1024, "cpu").train()
    peak = _live_peak(model, b, s)
    est = estimate_memory(cfg, 1, 1024, "cpu")
    # megatron's global buffer (local attention's baddbmm input) is allocated in the forward here; in the
    # estimate it is persistent (and out of the CPU RSS: never written)
    buffer = (2 if "bf16" in mods else 4) * b * 8 * s * s if backend == "local" else 0
    assert peak - buffer == pytest.approx(est.backward_peak, rel=0.06)


# ----------------------------------------------------------------------------------------------
# end to end: peak RSS of training runs


def child(spec: dict) -> None:
    """One training run: RSS before the Trainer is built, then a few train_steps; prints the max-RSS growth."""
    import torch

    torch.set_num_threads(spec["threads"])
    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.training.loop import Trainer

    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    before, files = rss("VmRSS"), rss("RssFile")
    trainer = Trainer(config_from_args(build_parser().parse_args(spec["argv"])))
    for step in range(spec["steps"]):
        trainer.train_step(step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    # A forked process faults the libraries' code pages back in as it runs them: file pages, not memory
    # the run allocated (they stay mapped to the end, so their growth at the end is their growth at the peak)
    code = rss("RssFile") - files
    print(CHILD_TAG + json.dumps({"name": spec["name"], "growth": peak - before - code, "file_pages": code,
                                  "vocab_ids": trainer.vocab_ids}), flush=True)


def zygote(specs: list[dict], parallel: int) -> None:
    """Import the trainer once, then fork one process per run (`parallel` at a time): each run's RSS is its
    own from the fork on, without paying torch's and megatron's imports again.  Nothing here runs a torch
    op before forking (no thread pool exists to be copied)."""
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_dataeff.training.loop  # noqa: F401

    running, failed = {}, []
    for spec in specs + [None] * parallel:
        while running and (spec is None or len(running) >= parallel):
            pid, status = os.wait()
            if status:
                failed.append(running[pid])
            running.pop(pid, None)
        if spec is None:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                child(spec)
                code = 0
            except BaseException:  # noqa: BLE001 - reported to the parent by the exit code
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        running[pid] = spec["name"]
    if failed:
        raise SystemExit(f"runs failed: {failed}")


@pytest.fixture(scope="module")
def random_datasets(tmp_path_factory):
    """Random-token indexed datasets (the project's writer) for NullTokenizer vocabularies, by --vocab-size."""
    from megatron_dataeff.data.synthetic import write_random_dataset

    root = tmp_path_factory.mktemp("random_tokens")
    return {v: write_random_dataset(str(root / f"v{v}"), v, num_docs=16, doc_tokens=4096) for v in (1022, 31998)}


WIDE = ["--num-layers", "4", "--hidden-size", "512", "--ffn-hidden-size", "1536", "--num-attention-heads", "8",
        "--num-query-groups", "4", "--seq-length", "512", "--micro-batch-size", "1"]
LONG = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "8",
        "--seq-length", "1024", "--micro-batch-size", "4"]
RUNS = {  # name: (shape and flags, NullTokenizer --vocab-size); the logits, the layers or the scores dominate
    "sdpa": (WIDE + ["--attention-backend", "sdpa"], 31998),
    "local": (LONG + ["--attention-backend", "local"], 1022),
    "full_recompute": (WIDE + ["--attention-backend", "sdpa", *RECOMPUTE["full_uniform"]], 31998),
    "bf16_local": (LONG + ["--num-layers", "1", "--attention-backend", "local", "--bf16"], 1022),
}
SLOW_RUNS = {
    "selective_mlp": (WIDE + ["--attention-backend", "sdpa", *RECOMPUTE["selective_mlp"]], 31998),
    "mdm_dropout_local": (LONG + ["--attention-backend", "local", "--objective", "mdm", *DROPOUT], 1022),
    "bf16_sdpa": (["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "384", "--num-attention-heads",
                   "4", "--seq-length", "256", "--micro-batch-size", "2", "--attention-backend", "sdpa", "--bf16"],
                  31998),
}


def _run_argv(flags: list[str], vocab: int, data: str, run_dir: Path) -> list[str]:
    return [*flags, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--data-path", data,
            "--train-iters", "100", "--lr-decay-style", "constant", "--eval-iters", "0", "--log-interval", "1000",
            "--tensorboard-dir", "", "--run-dir", str(run_dir), "--device", "cpu"]


def measure_runs(argvs: dict, steps: int = 2, parallel: int = 2) -> dict:
    """{name: max-RSS growth} of training runs, each in a process forked from one that imported the trainer;
    freed blocks are returned to the OS (MALLOC_MMAP_THRESHOLD_), so that the RSS follows live memory."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    specs = [{"name": name, "argv": argv, "steps": steps, "threads": 1} for name, argv in argvs.items()]
    proc = subprocess.run([sys.executable, __file__, json.dumps({"specs": specs, "parallel": parallel})], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"runs failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    out = [json.loads(ln[len(CHILD_TAG):]) for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    return {r["name"]: r for r in out}


def _runs(table: dict, random_datasets, tmp_path_factory) -> dict:
    """{name: (max-RSS growth, estimate)} of every run of `table`."""
    from megatron_dataeff.training.memory import estimate_memory

    argvs = {name: _run_argv(flags, vocab, random_datasets[vocab], tmp_path_factory.mktemp(name))
             for name, (flags, vocab) in table.items()}
    res = measure_runs(argvs)
    return {name: (res[name]["growth"], estimate_memory(_cfg(*argvs[name]), 1, res[name]["vocab_ids"], "cpu"))
            for name in table}


@pytest.fixture(scope="module")
def measured_runs(random_datasets, tmp_path_factory):
    """(max-RSS growth, estimate) of each of RUNS."""
    return _runs(RUNS, random_datasets, tmp_path_factory)


def _check_run(name, growth, est):
    mib = 2**20
    print(f"\n{name}: measured max-RSS growth {growth / mib:.0f} MiB, estimated {est.total / mib:.0f} MiB "
          f"({est.total / growth - 1:+.1%}; params {est.parameters / mib:.0f}, grads {est.gradients / mib:.0f}, "
          f"optimizer {est.optimizer_state / mib:.0f}, activations {est.activations / mib:.0f}, loss "
          f"{est.loss / mib:.0f}, transient {est.transient / mib:.0f} at {est.peak_moment})")
    assert est.total == pytest.approx(growth, rel=0.15)


@pytest.mark.parametrize("name", list(RUNS))
def test_estimate_within_15_percent_of_training_peak_rss(measured_runs, name):
    """The estimated peak is within 15% of a real two-step training run's max-RSS growth (without the file
    pages the run faults in, which the estimate states as its CPU allowance): sdpa, megatron's local
    attention, full recomputation, bf16."""
    _check_run(name, *measured_runs[name])


@pytest.mark.slow
def test_estimate_within_15_percent_of_training_peak_rss_more(random_datasets, tmp_path_factory):
    """As above for selective recomputation, masked diffusion with every dropout, bf16 sdpa."""
    for name, (growth, est) in _runs(SLOW_RUNS, random_datasets, tmp_path_factory).items():
        _check_run(name, growth, est)


def layout_child(flags: list[str]) -> None:
    """Under torchrun: this rank's parameter count and what one of its layers saves, as one JSON line."""
    import torch.distributed as dist

    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.models.builder import build_model, count_parameters
    from megatron_dataeff.distributed import initialize

    cfg = config_from_args(build_parser().parse_args(["--device", "cpu", *flags]))
    cfg.validate_layout(int(os.environ["WORLD_SIZE"]))
    rt = initialize(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, 1234, "cpu")
    model = build_model(cfg, IDS, "cpu").train()
    layer = None
    if cfg.parallel.pipeline_model_parallel_size == 1:
        saved = _saved_storages(model, cfg.optim.micro_batch_size, cfg.model.seq_length)
        layer = sum(n for name, n in saved.values() if name.split(".")[:3] == ["decoder", "layers", "1"])
    # one file per rank: two ranks printing to one pipe can interleave their lines
    with open(os.path.join(os.environ["LAYOUT_OUT"], f"rank{rt.rank}.json"), "w") as fh:
        json.dump({"rank": rt.rank, "pp_rank": rt.pp_rank, "params": count_parameters(model), "layer": layer}, fh)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"]],
                         ids=["tp2", "tp2_sp", "pp2"])
def test_two_process_layouts_match_the_estimate(layout, tmp_path):
    """Under TP=2 (with and without sequence parallelism) one layer saves what the estimate says per rank;
    under PP=2 each stage holds the estimated parameters (the last one a copy of the tied embedding)."""
    from megatron_dataeff.training.memory import estimate_stages, parameter_counts
    from tests.conftest import free_port

    flags = [*SMALL, "--num-layers", "4", "--num-query-groups", "2", "--attention-backend", "sdpa", *layout]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LAYOUT_OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", __file__, json.dumps({"layout": flags})],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks) == 2
    cfg = _cfg(*flags, world_size=2)
    stages = estimate_stages(cfg, 2, IDS, "cpu")
    for r in ranks:
        assert r["params"] == sum(parameter_counts(cfg, IDS, r["pp_rank"]))
        if r["layer"] is not None:
            assert r["layer"] == pytest.approx(sum(stages[0].per_layer.values()), rel=0.01)


# ----------------------------------------------------------------------------------------------
# layouts, devices, the tool


def test_pipeline_stages_hold_their_parts(monkeypatch):
    """With PP=2 the first stage holds the embedding and 2 micro-batches in flight (1F1B), the last the
    output layer (a copy of the tied embedding), the final norm and the logits, with 1 in flight."""
    from megatron_dataeff.models import loss_choice
    from megatron_dataeff.training.memory import estimate_stages, parameter_counts

    monkeypatch.setattr(loss_choice, "linear_fusion_installed", lambda: False)  # as where CCE is not installed

    cfg = _cfg("--model-preset", "qwen3-0.6b", "--bf16", "--micro-batch-size", "1", "--global-batch-size", "8",
               "--pipeline-model-parallel-size", "2", world_size=2)
    first, last = estimate_stages(cfg, 2, 151670, "cuda")
    whole = sum(parameter_counts(_cfg("--model-preset", "qwen3-0.6b"), 151670))
    embedding, hidden = 151680 * 1024, 1024
    assert sum(parameter_counts(cfg, 151670, 0)) + sum(parameter_counts(cfg, 151670, 1)) == whole + embedding
    assert (first.layers, last.layers) == (14, 14)
    assert (first.micro_batches_in_flight, last.micro_batches_in_flight) == (2, 1)
    layer, tokens = sum(first.per_layer.values()), 4096
    assert first.activations == 2 * (14 * layer + 8 * tokens)  # + the token ids the embedding keeps
    head = last.activations - 14 * layer  # final norm (CUDA's fused kernel: input, rstd); output layer input
    assert head == 2 * tokens * hidden + 4 * tokens + 2 * tokens * hidden
    # auto loss (models/loss_choice.py): on the default 80 GB device the fp32 logits (2.3 GiB) are under 1/16 of
    # its memory, so megatron's loss and its fp32 softmax; on a 16 GB one they are not: the chunked loss keeps
    # the bf16 logits and 17 bytes a token
    assert first.loss == 0 and last.loss == 4 * tokens * 151680 + 9 * tokens
    small = estimate_stages(cfg, 2, 151670, "cuda", capacity_bytes=16 * 10**9)[1]
    assert small.loss == 2 * tokens * 151680 + 17 * tokens
    # with Cut Cross-Entropy installed auto fuses the output layer and the loss: no logits, the log-sum-exp and
    # the targets kept
    monkeypatch.setattr(loss_choice, "linear_fusion_installed", lambda: True)
    assert estimate_stages(cfg, 2, 151670, "cuda")[1].loss == 12 * tokens


def test_tensor_and_sequence_parallel_split_the_layer():
    """TP=2 halves every per-layer term but the [s, b, h] ones; sequence parallelism halves those too."""
    from megatron_dataeff.training.memory import estimate_memory

    base = ["--model-preset", "qwen3-0.6b", "--bf16", "--micro-batch-size", "1"]
    one = estimate_memory(_cfg(*base), 1, 151670).per_layer
    tp = estimate_memory(_cfg(*base, "--tensor-model-parallel-size", "2", world_size=2), 2, 151670).per_layer
    sp = estimate_memory(_cfg(*base, "--tensor-model-parallel-size", "2", "--sequence-parallel", world_size=2), 2,
                         151670).per_layer
    for k, v in one.items():
        if k not in ("rope.cos_sin",):
            assert tp[k] == (v if k.startswith(("x", "ln1.", "r1", "ln2.")) else v // 2), k
            assert sp[k] == v // 2, k


def test_distributed_optimizer_shards_the_optimizer_state():
    """--use-distributed-optimizer divides the optimizer state by the data-parallel size, nothing else."""
    from megatron_dataeff.training.memory import estimate_memory

    base = ["--model-preset", "qwen3-0.6b", "--bf16", "--micro-batch-size", "1"]
    plain = estimate_memory(_cfg(*base, world_size=8), 8, 151670)
    sharded = estimate_memory(_cfg(*base, "--use-distributed-optimizer", world_size=8), 8, 151670)
    assert sharded.optimizer_state == pytest.approx(plain.optimizer_state / 8, abs=8)
    assert (sharded.parameters, sharded.gradients, sharded.activations) == \
        (plain.parameters, plain.gradients, plain.activations)


def test_cuda_paths_and_allowances():
    """On CUDA the estimate keeps 1-byte dropout masks, the fused SwiGLU, the fused RMSNorm (weight and
    input share a dtype, fp32 and bf16 alike; the CPU composite keeps fp32 copies), flash
    attention's [b, heads, s] log-sum-exp, and states its allowances apart; local attention keeps the
    [b, heads, s, s] tensors `unfused_attention_bytes` says."""
    from megatron_dataeff.training.memory import estimate_memory, unfused_attention_bytes

    base = ["--model-preset", "qwen3-0.6b", "--bf16", "--micro-batch-size", "2", "--hidden-dropout", "0.1"]
    gpu = estimate_memory(_cfg(*base), 1, 151670, "cuda")
    cpu = estimate_memory(_cfg(*base), 1, 151670, "cpu")
    assert gpu.per_layer["bda1.mask"] * 2 == cpu.per_layer["bda1.mask"]
    assert "swiglu.silu" in cpu.per_layer and "swiglu.silu" not in gpu.per_layer
    assert "ln1.normed" in cpu.per_layer and "ln1.normed" not in gpu.per_layer
    assert gpu.per_layer["x"] == 2 * 2 * 4096 * 1024  # the bf16 input itself
    fp32 = estimate_memory(_cfg(*base[:2], *base[3:]), 1, 151670, "cuda")
    assert "ln1.normed" not in fp32.per_layer and fp32.per_layer["x"] == 4 * 2 * 4096 * 1024
    assert gpu.per_layer["attention.lse"] == 4 * 2 * 16 * 4096
    assert {"cuda context", "cuBLAS workspaces", "allocator fragmentation"} <= set(gpu.allowances)
    assert gpu.total_with_allowances == gpu.total + sum(gpu.allowances.values())
    local = estimate_memory(_cfg(*base, "--attention-backend", "local"), 1, 151670, "cuda")
    assert local.per_layer["attention.probs"] == unfused_attention_bytes(2, 16, 4096, "bf16", 0.0)
    assert local.buffers == 2 * 2 * 16 * 4096 * 4096  # megatron's baddbmm input buffer, written on CUDA


def test_fits_uses_the_cards_capacity():
    """`fits` compares the peak with allowances against what the driver reports for 80 and 141 GB cards."""
    from megatron_dataeff.training.memory import device_capacity, estimate_memory

    est = estimate_memory(_cfg("--model-preset", "qwen3-0.6b", "--bf16", "--micro-batch-size", "4"), 1, 151670)
    assert device_capacity(80) == 81559 * 2**20 and device_capacity(141) == 143771 * 2**20
    assert device_capacity(24) == 24 * 2**30
    fits = est.fits([1, 80, 141])
    assert fits == {1.0: False, 80.0: est.total_with_allowances <= device_capacity(80), 141.0: True}


def test_tool_prints_the_table_without_importing_torch():
    """tools/estimate_memory.py estimates qwen3-0.6b from the trainer's flags without importing
    torch, and says whether it fits each device size."""
    code = ("import runpy, sys; sys.argv = ['estimate_memory.py', '--model-preset', "
            "'qwen3-0.6b', '--bf16', '--micro-batch-size', '4', '--tokenizer-type', 'HuggingFaceTokenizer', "
            "'--world-size', '2', '--tensor-model-parallel-size', '2', '--sequence-parallel', '--gpu-memory-gb', "
            "'80,141']\ntry:\n    runpy.run_path('tools/estimate_memory.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code\n"
            "print('TORCH', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "TORCH False" in out
    assert "151,670 ids" in out and "world 2 = TP 2 x PP 1 x DP 1" in out
    assert "80 GB" in out and "141 GB" in out and "peak with allowances" in out


def test_tool_refuses_a_layout_naming_the_flag():
    """A layout that cannot work is refused by the tool with the trainer's message."""
    proc = subprocess.run([sys.executable, "tools/estimate_memory.py", "--model-preset", "qwen3-0.6b",
                           "--tensor-model-parallel-size", "3", "--world-size", "3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "--tensor-model-parallel-size 3" in proc.stderr


def test_startup_report_warns_for_unfused_attention_at_long_sequence():
    """The GPU start-up lines give the estimate against the device, say when it will not fit, and for
    unfused attention at seq >= 2048 give the memory its score tensors take (sdpa: no such line)."""
    from megatron_dataeff.training.memory import GiB, startup_report

    base = ["--model-preset", "qwen3-0.6b", "--bf16", "--micro-batch-size", "4"]
    sdpa = startup_report(_cfg(*base), 1, 151670, 141 * GiB)
    assert len(sdpa) == 1 and "of 141.0 GiB on this device" in sdpa[0] and "run out of memory" not in sdpa[0]
    local = startup_report(_cfg(*base, "--attention-backend", "local"), 1, 151670, 141 * GiB)
    assert "run out of memory" in local[0]
    assert "attention local (unfused) at seq 4096" in local[1] and "6.00 GiB per layer per micro-batch of 4" in local[1]


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    if "layout" in job:
        layout_child(job["layout"])
    else:
        zygote(job["specs"], job["parallel"])
