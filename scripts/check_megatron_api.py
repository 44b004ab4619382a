#!/usr/bin/env python
"""Static check of megatron_dataeff's use of megatron-core against an unpacked megatron-core source tree.

    python scripts/check_megatron_api.py /tmp/mcore_src/0.19.2 [--baseline /tmp/mcore_src/0.16.1]

The tree is a directory holding `megatron/core/...` (an unzipped wheel, a Megatron-LM checkout or a
site-packages directory).  Nothing of megatron is imported: both our sources and megatron's are read
with `ast`.  Prints `OK` or one line per mismatch (`our_file:line: what is missing`); exits 1 on any.

What it checks, derived from our sources (megatron_dataeff/, pretrain_diffusion.py, tools/, benchmarks/,
tests/):

* every `import megatron...` / `from megatron... import name`: the module file exists and `name` is
  defined in it (def, class, assignment, import / re-export, star import, or a submodule);
* every attribute read or assigned on something known to be a megatron object: a module
  (`parallel_state.get_..._rank`, `mrandom._get_cuda_rng_state = ...`), a class (`AttnMaskType.no_mask`),
  an instance built in the same scope (`StaticInferenceContext(...)`, `IndexedDatasetBuilder(...)`),
  an instance returned by one of our functions (return annotation or `return x`), or a megatron base
  class reached through `self` / `super()` in our subclasses (`RegularizedMLP`);
* every call of such a callable: each keyword argument we pass is a parameter (or the callee takes
  **kwargs), no more positional arguments than it takes, and no required parameter left out.
  Class calls check `__init__` through the MRO, or for dataclasses the init fields including
  inherited ones (`field(init=False)`, `ClassVar`, `KW_ONLY` respected); our own dataclass
  subclasses (`DataEffTransformerConfig(TransformerConfig)`) add their fields.  `**kwargs` built as
  `kwargs = dict(...)` / `kwargs.update(...)` (also from one of our functions returning a dict
  literal, e.g. `platform.cpu_config_overrides()`) are expanded key by key;
* unguarded top-level third-party imports that importing our megatron modules pulls in (transitively)
  and that are not installed in this Python environment.

What cannot be derived (receivers whose type only megatron knows: the `model` the schedule hands to
our forward step, `model.decoder.layers`, the optimizer returned by `get_megatron_optimizer`) is in
hand-written lists below: RETURNS (what a megatron function returns), HAND_ATTRS (attributes read
off megatron objects), HAND_CALLS (calls on such receivers, arguments taken from our source),
HAND_FIELD_TYPES (spec fields we mutate must still be ModuleSpecs) and HAND_SOURCE_REFS (behaviour
we rely on, seen as a name megatron's code must or must not use: the checkpoint files `save` writes,
`InferenceMode` gating of GPTModel, an unconditional `torch.cuda.current_stream()` in DDP).  Each
entry names the line of ours it stands for; an entry whose line is gone is reported ("hand list
stale"), so the lists cannot rot silently.

With --baseline, calls passing positional arguments are also compared: a positional argument that
binds to a differently named parameter in TREE than in the baseline is reported (a reordered
signature).  Code our sources guard is not reported: imports inside `try/except ImportError` and
attributes inside `if hasattr(obj, "attr")`.  --project points at another checkout of ours (e.g. a
copy with a change to try); -v lists every check made.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
OUR_SOURCES = ["megatron_dataeff/**/*.py", "pretrain_diffusion.py", "tools/*.py", "benchmarks/*.py", "tests/*.py"]

# ----------------------------------------------------------------------------------------------------
# The hand-written part.  Paths are public import paths, resolved in the tree under test.

# What a megatron function returns, where our code calls what it returns.
RETURNS = {
    "megatron.core.pipeline_parallel.get_forward_backward_func": [
        "megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
        "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving",
        "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_with_interleaving",
    ],
    "megatron.core.tensor_parallel.random.get_cuda_rng_tracker": [
        "megatron.core.tensor_parallel.random.CudaRNGStatesTracker()",  # "()": an instance
    ],
    "megatron.core.optimizer.get_megatron_optimizer": [
        "megatron.core.optimizer.optimizer.MegatronOptimizer()",
    ],
}

GPT_MODEL = "megatron.core.models.gpt.gpt_model.GPTModel"
SELF_ATTENTION = "megatron.core.transformer.attention.SelfAttention"
TRANSFORMER_CONFIG = "megatron.core.transformer.transformer_config.TransformerConfig"
OPTIMIZERS = [  # what get_megatron_optimizer may return for our configs
    "megatron.core.optimizer.optimizer.MegatronOptimizer",
    "megatron.core.optimizer.optimizer.MixedPrecisionOptimizer",
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params",
    "megatron.core.optimizer.optimizer.FP32Optimizer",
    "megatron.core.optimizer.optimizer.ChainedOptimizer",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer",
]


@dataclass
class HandAttr:
    """`cls` (every one of `cls` when a list) has each of `attrs`; stands for the line of `file`
    containing `snippet`.  soft: our code guards the access (getattr/hasattr), so a missing
    attribute silently changes behaviour rather than raising."""

    file: str
    snippet: str
    cls: object
    attrs: list
    soft: bool = False


@dataclass
class HandCall:
    """The calls in `file` whose callee's source is `callee` (and whose source contains `contains`)
    call `target` (each of a list): their arguments are checked against its signature.  `positional`
    names the parameters our positional arguments mean (checked in order).  `bound`: target is a
    method reached through an instance, or a module called as a function (forward via __call__)."""

    file: str
    callee: str
    target: object
    contains: str = ""
    positional: tuple = ()
    bound: bool = True


HAND_ATTRS = [
    # training/optimizer.py: the distributed optimizer's parameter-state copy (a load without apex / TE)
    HandAttr("megatron_dataeff/training/optimizer.py", 'getattr(dist_opt, "model_param_group_index_map"',
             "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer",
             ["_set_main_param_and_optimizer_states", "model_param_group_index_map"], soft=True),
    # inference/kv_cache.py: the model, its layers and the static inference context
    HandAttr("megatron_dataeff/inference/kv_cache.py", "model.pre_process and model.post_process", GPT_MODEL,
             ["pre_process", "post_process", "decoder"]),
    HandAttr("megatron_dataeff/inference/kv_cache.py", "for layer in model.decoder.layers",
             "megatron.core.transformer.transformer_block.TransformerBlock", ["layers"]),
    HandAttr("megatron_dataeff/inference/kv_cache.py", "layer.self_attention.attn_mask_type",
             "megatron.core.transformer.transformer_layer.TransformerLayer", ["self_attention"]),
    HandAttr("megatron_dataeff/inference/kv_cache.py", "layer.self_attention.attn_mask_type", SELF_ATTENTION,
             ["attn_mask_type"]),
    HandAttr("megatron_dataeff/inference/kv_cache.py", "attn.num_query_groups_per_partition", SELF_ATTENTION,
             ["num_query_groups_per_partition", "key_hidden_size", "val_hidden_size", "layer_number"]),
    HandAttr("megatron_dataeff/inference/kv_cache.py", "context.key_value_memory_dict[",
             "megatron.core.inference.contexts.StaticInferenceContext",
             ["key_value_memory_dict", "sequence_len_offset"]),
    # models/layer_specs.py: the spec returned by get_gpt_layer_local_spec
    HandAttr("megatron_dataeff/models/layer_specs.py", "attention = spec.submodules.self_attention",
             "megatron.core.transformer.spec_utils.ModuleSpec", ["submodules", "params", "module"]),
    HandAttr("megatron_dataeff/models/layer_specs.py", "attention = spec.submodules.self_attention",
             "megatron.core.transformer.transformer_layer.TransformerLayerSubmodules", ["self_attention", "mlp"]),
    # models/mlp.py: RegularizedMLP reads the config and the two linears
    HandAttr("megatron_dataeff/models/mlp.py", "self.config.gated_linear_unit", TRANSFORMER_CONFIG,
             ["gated_linear_unit", "activation_func"]),
    HandAttr("megatron_dataeff/models/mlp.py", "self.mlp_dropout = float(getattr(self.config",
             "megatron.core.transformer.mlp.MLP", ["config", "linear_fc1", "linear_fc2"]),
    # training: config fields we set after building, DDP wrapper, optimizer, scheduler
    HandAttr("megatron_dataeff/training/loop.py", "tc.no_sync_func = ", TRANSFORMER_CONFIG,
             ["no_sync_func", "finalize_model_grads_func", "grad_scale_func"]),
    HandAttr("megatron_dataeff/training/loop.py", "self.transformer_config = model.config", GPT_MODEL, ["config"]),
    HandAttr("megatron_dataeff/training/optimizer.py", "model_chunks[0].config.params_dtype",
             TRANSFORMER_CONFIG, ["params_dtype"]),
    HandAttr("megatron_dataeff/training/loop.py", "m.zero_grad_buffer()",
             "megatron.core.distributed.DistributedDataParallel", ["zero_grad_buffer", "no_sync", "module"]),
    HandAttr("megatron_dataeff/training/loop.py", "ok, grad_norm, _ = self.optimizer.step()", OPTIMIZERS,
             ["step", "zero_grad", "scale_loss", "param_groups", "sharded_state_dict", "load_state_dict"]),
    HandAttr("megatron_dataeff/training/checkpointing.py", "trainer.scheduler.state_dict()",
             "megatron.core.optimizer_param_scheduler.OptimizerParamScheduler", ["step", "state_dict", "load_state_dict"]),
    HandAttr("megatron_dataeff/training/checkpointing.py", "model_sd = trainer.model[0].module.sharded_state_dict()",
             GPT_MODEL, ["sharded_state_dict"]),
    # export: weights and RoPE read off the model
    HandAttr("megatron_dataeff/export/hf_export.py", "model.embedding.word_embeddings.weight", GPT_MODEL,
             ["embedding"]),
    HandAttr("megatron_dataeff/export/hf_export.py", "model.embedding.word_embeddings.weight",
             "megatron.core.models.common.embeddings.language_model_embedding.LanguageModelEmbedding",
             ["word_embeddings"]),
    HandAttr("megatron_dataeff/export/hf_mapping.py", 'getattr(model, "rotary_pos_emb", None)', GPT_MODEL,
             ["rotary_pos_emb", "position_embedding_type"], soft=True),
    HandAttr("megatron_dataeff/export/hf_mapping.py", "rope.inv_freq",
             "megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding", ["inv_freq"]),
    HandAttr("megatron_dataeff/export/hf_mapping.py", "seq_len_interpolation_factor",
             "megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding",
             ["seq_len_interpolation_factor"], soft=True),
    HandAttr("megatron_dataeff/export/hf_mapping.py", "config.kv_channels", TRANSFORMER_CONFIG, ["kv_channels"]),
    HandAttr("megatron_dataeff/export/hf_mapping.py", "REQUIRED_MEGATRON_OPTIONS = {", TRANSFORMER_CONFIG,
             ["@dict-keys:REQUIRED_MEGATRON_OPTIONS"], soft=True),
    HandAttr("tests/test_export_hf.py", "model.config.add_qkv_bias = True", TRANSFORMER_CONFIG,
             ["add_qkv_bias", "normalization"]),
    # data: megatron's indexed dataset reader
    HandAttr("megatron_dataeff/data/samples.py", "dataset.sequence_lengths",
             "megatron.core.datasets.indexed_dataset.IndexedDataset", ["sequence_lengths", "document_indices", "index"]),
    HandAttr("tests/test_preprocess.py", "ds.index.dtype", "megatron.core.datasets.indexed_dataset._IndexReader",
             ["dtype"]),
]

@dataclass
class HandFieldType:
    """Field `field` of dataclass `cls` must be annotated with a type mentioning `mentions`: our line
    treats the value as one (e.g. sets `.module` on a ModuleSpec; on anything else that is a no-op)."""

    file: str
    snippet: str
    cls: str
    field: str
    mentions: str
    why: str
    unless: str = ""  # text whose presence in `file` means we already handle other builders


HAND_FIELD_TYPES = [
    HandFieldType("megatron_dataeff/models/layer_specs.py", "mlp.module = cls",
                  "megatron.core.transformer.transformer_layer.TransformerLayerSubmodules", "mlp", "ModuleSpec",
                  "we replace the MLP class by setting `.module` on it; on a non-ModuleSpec builder (e.g. a "
                  "functools.partial) that assignment silently does nothing and --mlp-dropout is ignored",
                  unless="as_mlp_submodule"),
    HandFieldType("megatron_dataeff/models/layer_specs.py", "attention = spec.submodules.self_attention",
                  "megatron.core.transformer.transformer_layer.TransformerLayerSubmodules", "self_attention",
                  "ModuleSpec",
                  "we set `.params['attn_mask_type']` on it to make masked diffusion bidirectional"),
]

@dataclass
class HandSourceRef:
    """The body of megatron function `func` must (present=True) or must not (present=False) mention
    identifier `ident` (a name or attribute; toplevel: only in statements run unconditionally):
    our line relies on what megatron does there (a file it writes, a mode it checks, a CUDA call
    our CPU mode does not stub)."""

    file: str
    snippet: str
    func: str
    ident: str
    why: str
    present: bool = True
    toplevel: bool = False
    unless: str = ""  # text whose presence in `file` means we already handle the change
    only_if: str = ""  # text whose absence from `file` means we no longer rely on this


HAND_SOURCE_REFS = [
    HandSourceRef("megatron_dataeff/training/checkpointing.py", "def check_checkpoint_files",
                  "megatron.core.dist_checkpointing.serialization.save", "save_common",
                  "_check_files requires common.pt in every checkpoint; a save that no longer writes it "
                  "(the common state stored as a shard instead) makes every load fail as 'incomplete'",
                  only_if='"common.pt"', unless="no common.pt"),
    HandSourceRef("megatron_dataeff/inference/kv_cache.py", "inference_context=self._context",
                  GPT_MODEL + "._postprocess", "InferenceMode",
                  "GPTModel now applies inference behaviour (last-token-only logits) only inside "
                  "megatron.core.inference.utils.InferenceMode.active(); called without it, KVCacheLogits "
                  "returns logits for every new position instead of [batch, 1, vocab]", present=False,
                  unless="InferenceMode"),
    HandSourceRef("megatron_dataeff/platform.py", "cuda.memory_allocated = ",
                  "megatron.core.distributed.param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync",
                  "current_stream",
                  "DDP grad sync calls torch.cuda.current_stream() unconditionally; enable_cpu_support() does "
                  "not stub it, so every CPU training step fails with 'Torch not compiled with CUDA enabled'",
                  present=False, toplevel=True, unless="current_stream"),
    HandSourceRef("megatron_dataeff/training/optimizer.py", "def _skip_step_in_param_state_copy",
                  "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
                  "dst_tensors",
                  "the distributed optimizer's per-parameter state copy no longer walks the live keys "
                  "(dst_tensors, `step` among them): recheck whether _skip_step_in_param_state_copy is still needed",
                  only_if="def _skip_step_in_param_state_copy"),
    HandSourceRef("tests/test_tokenizers.py", "(1001, 1000)",
                  "megatron.core.tokenizers.text.libraries.null_tokenizer.NullTokenizer.__init__",
                  "_vocab_size_without_eod",
                  "megatron's NullTokenizer(V) no longer has V + 1 ids with EOD = V (our NullTokenizer's "
                  "convention, which this test compares against)",
                  unless="since_018")
]

HAND_CALLS = [
    # GPTModel.forward(input_ids, position_ids, attention_mask, ...): via nn.Module.__call__
    HandCall("megatron_dataeff/training/loop.py", "model", GPT_MODEL + ".forward", "labels=labels",
             ("input_ids", "position_ids", "attention_mask")),
    HandCall("megatron_dataeff/inference/kv_cache.py", "self.model", GPT_MODEL + ".forward", "inference_context=",
             ("input_ids", "position_ids", "attention_mask")),
    HandCall("megatron_dataeff/evaluation/scoring.py", "self.model", GPT_MODEL + ".forward", "",
             ("input_ids", "position_ids", "attention_mask")),
    HandCall("megatron_dataeff/inference/generate.py", "model", GPT_MODEL + ".forward", "pos, None",
             ("input_ids", "position_ids", "attention_mask")),
    HandCall("tests/test_attention.py", "model", GPT_MODEL + ".forward", "pos, None",
             ("input_ids", "position_ids", "attention_mask")),
    # the two linears of the MLP (forward returns (output, bias))
    HandCall("megatron_dataeff/models/mlp.py", "self.linear_fc1",
             "megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward", positional=("input_",)),
    HandCall("megatron_dataeff/models/mlp.py", "self.linear_fc2",
             "megatron.core.tensor_parallel.layers.RowParallelLinear.forward", positional=("input_",)),
    HandCall("tests/test_attention.py", "mlp.linear_fc1",
             "megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward", positional=("input_",)),
    HandCall("tests/test_attention.py", "mlp", "megatron.core.transformer.mlp.MLP.forward",
             positional=("hidden_states",)),
    # optimizer / scheduler / DDP / model methods on receivers built elsewhere
    HandCall("megatron_dataeff/training/checkpointing.py", "trainer.optimizer.sharded_state_dict",
             [o + ".sharded_state_dict" for o in OPTIMIZERS[2:]], positional=("model_sharded_state_dict",)),
    HandCall("megatron_dataeff/training/checkpointing.py", "trainer.optimizer.load_state_dict",
             [o + ".load_state_dict" for o in OPTIMIZERS[2:]]),
    HandCall("megatron_dataeff/training/loop.py", "self.optimizer.step", [o + ".step" for o in OPTIMIZERS[2:]]),
    HandCall("megatron_dataeff/training/loop.py", "self.optimizer.zero_grad",
             [o + ".zero_grad" for o in OPTIMIZERS[2:]]),
    HandCall("megatron_dataeff/training/loop.py", "self.scheduler.step",
             "megatron.core.optimizer_param_scheduler.OptimizerParamScheduler.step"),
    HandCall("megatron_dataeff/training/checkpointing.py", "trainer.scheduler.load_state_dict",
             "megatron.core.optimizer_param_scheduler.OptimizerParamScheduler.load_state_dict"),
    HandCall("megatron_dataeff/training/loop.py", "m.zero_grad_buffer",
             "megatron.core.distributed.DistributedDataParallel.zero_grad_buffer"),
    HandCall("megatron_dataeff/training/checkpointing.py", "trainer.model[0].module.sharded_state_dict",
             GPT_MODEL + ".sharded_state_dict"),
    HandCall("megatron_dataeff/export/hf_import.py", "model.sharded_state_dict", GPT_MODEL + ".sharded_state_dict"),
    # the spec's params become keyword arguments of SelfAttention.__init__ (build_module)
    HandCall("megatron_dataeff/models/layer_specs.py", "@kw:attn_mask_type", SELF_ATTENTION + ".__init__"),
]

# ----------------------------------------------------------------------------------------------------
# Symbols


@dataclass(eq=False)
class Sym:
    kind: str  # module | class | func | value | external | dynamic | inst | multi | super
    mod: str = ""  # module of definition (module: its name)
    name: str = ""  # qualified name inside mod; external: dotted name
    node: object = None
    scope: object = None  # class/func: the scope it was defined in
    cls: object = None  # func: owning class Sym (methods); inst/super: the class Sym
    bound: bool = False  # func reached through an instance
    items: list = field(default_factory=list)  # multi: alternatives

    @property
    def qual(self):
        return f"{self.mod}.{self.name}" if self.name else self.mod

    @property
    def is_megatron(self):
        m = self.mod if self.kind != "external" else self.name
        return m == "megatron" or m.startswith("megatron.")


def _is_megatron_module(mod: str) -> bool:
    return mod == "megatron" or mod.startswith("megatron.")


@dataclass
class Problem:
    file: str
    line: int
    msg: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.msg}"


class Scope:
    """Names bound in a module, function or class body, resolved lazily."""

    def __init__(self, an: "Analyzer", mod: str, node, parent: "Scope | None", kind: str, cls_sym=None):
        self.an, self.mod, self.node, self.parent, self.kind = an, mod, node, parent, kind
        self.bindings: dict[str, list] = {}
        self.stars: list[str] = []
        self.dynamic = False
        self.all_names = None
        self.cls_sym = cls_sym
        self._collect()

    def _bind(self, name, how):
        self.bindings.setdefault(name, []).append(how)

    def _collect(self):
        node = self.node
        if self.kind == "func":
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            for i, p in enumerate(params):
                if i == 0 and self.cls_sym is not None and not _is_static(node):
                    self._bind(p.arg, ("self", _is_classmethod(node)))
                else:
                    self._bind(p.arg, ("unknown",))
            for p in (a.vararg, a.kwarg):
                if p:
                    self._bind(p.arg, ("unknown",))
        body = node.body if not isinstance(node, ast.Lambda) else []
        for stmt, guarded in _walk_statements(body):
            self._collect_stmt(stmt, guarded)

    def _collect_stmt(self, stmt, guarded):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._bind(stmt.name, ("def", stmt, guarded))
            if stmt.name == "__getattr__" and self.kind == "module":
                self.dynamic = True
        elif isinstance(stmt, ast.Import):
            for al in stmt.names:
                if al.asname:
                    self._bind(al.asname, ("module", al.name, guarded))
                else:
                    self._bind(al.name.split(".")[0], ("module", al.name.split(".")[0], guarded))
        elif isinstance(stmt, ast.ImportFrom):
            src = self.an.resolve_relative(self.mod, stmt.module, stmt.level)
            for al in stmt.names:
                if al.name == "*":
                    self.stars.append(src)
                else:
                    self._bind(al.asname or al.name, ("from", src, al.name, guarded, stmt))
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    if isinstance(stmt, ast.AugAssign) or stmt.value is None:
                        self._bind(t.id, ("unknown",))
                    else:
                        self._bind(t.id, ("expr", stmt.value, guarded))
                    if t.id == "__all__" and isinstance(stmt.value, (ast.List, ast.Tuple)):
                        self.all_names = {e.value for e in stmt.value.elts if isinstance(e, ast.Constant)}
                elif isinstance(t, ast.Tuple) and isinstance(getattr(stmt, "value", None), ast.Tuple) and \
                        len(t.elts) == len(stmt.value.elts) and \
                        all(isinstance(e, ast.Name) for e in t.elts):  # a, b = X(...), Y(...)
                    for e, v in zip(t.elts, stmt.value.elts):
                        self._bind(e.id, ("expr", v, guarded))
                else:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            self._bind(n.id, ("unknown",))
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            for n in ast.walk(stmt.target):
                if isinstance(n, ast.Name):
                    self._bind(n.id, ("unknown",))
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                if item.optional_vars is not None:
                    for n in ast.walk(item.optional_vars):
                        if isinstance(n, ast.Name):
                            self._bind(n.id, ("unknown",))
        elif isinstance(stmt, ast.ExceptHandler) and stmt.name:
            self._bind(stmt.name, ("unknown",))

    def has(self, name):
        return name in self.bindings

    def lookup(self, name, ctx=None):
        """Sym bound to `name` here or in an enclosing scope, else None."""
        s = self
        while s is not None:
            if name in s.bindings:
                return s.resolve_local(name, ctx)
            if s.kind == "module":
                for src in s.stars:
                    sym = self.an.lookup(src, name, exported=True)
                    if sym is not None:
                        return sym
                break
            s = s.parent
            while s is not None and s.kind == "class":  # class bodies are not visible in methods
                s = s.parent
        return None

    def resolve_local(self, name, ctx=None):
        hows = self.bindings.get(name, [])
        # Prefer bindings outside except-handlers (the try branch is what a normal install gets).
        ordered = [h for h in hows if not _guarded(h)] + [h for h in hows if _guarded(h)]
        for how in ordered:
            sym = self.an.resolve_binding(self, name, how, ctx)
            if sym is not None:
                return sym
        return None


def _guarded(how):
    """True for a binding made inside an except-handler (a fallback)."""
    if how[0] in ("def", "module", "expr"):
        return how[2] is True
    return how[0] == "from" and how[3] is True


def _walk_statements(body, guarded=False):
    """Statements of a body, descending into if/try/with/for/while blocks (not defs); guarded is
    True inside except handlers."""
    for stmt in body:
        yield stmt, guarded
        if isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While)):
            yield from _walk_statements(stmt.body, guarded)
            yield from _walk_statements(stmt.orelse, guarded)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _walk_statements(stmt.body, guarded)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            yield from _walk_statements(stmt.body, guarded)
            for h in stmt.handlers:
                yield h, True
                yield from _walk_statements(h.body, True)
            yield from _walk_statements(stmt.orelse, guarded)
            yield from _walk_statements(stmt.finalbody, guarded)
        elif isinstance(stmt, ast.Match):
            for case in stmt.cases:
                yield from _walk_statements(case.body, guarded)


def _decorator_names(node):
    out = []
    for d in getattr(node, "decorator_list", []):
        d = d.func if isinstance(d, ast.Call) else d
        out.append(ast.unparse(d))
    return out


def _is_static(node):
    return any(n.endswith("staticmethod") for n in _decorator_names(node))


def _is_classmethod(node):
    return any(n.endswith("classmethod") for n in _decorator_names(node))


# ----------------------------------------------------------------------------------------------------
# Signatures


@dataclass
class Param:
    name: str
    kind: str  # posonly | pos | kwonly
    required: bool


@dataclass
class Signature:
    params: list
    varargs: bool
    varkw: bool
    where: str  # for messages

    def positional(self):
        return [p for p in self.params if p.kind in ("posonly", "pos")]


def func_signature(node, skip_first: bool, where: str) -> Signature:
    a = node.args
    params = []
    pos = [*a.posonlyargs, *a.args]
    ndef = len(a.defaults)
    for i, p in enumerate(pos):
        params.append(Param(p.arg, "posonly" if i < len(a.posonlyargs) else "pos", i < len(pos) - ndef))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(Param(p.arg, "kwonly", d is None))
    if skip_first and params and params[0].kind != "kwonly":
        params = params[1:]
    return Signature(params, a.vararg is not None, a.kwarg is not None, where)


# ----------------------------------------------------------------------------------------------------


class Analyzer:
    def __init__(self, tree: Path, project: Path):
        self.tree = tree
        self.project = project
        self.asts: dict[Path, ast.Module] = {}
        self.scopes: dict[int, Scope] = {}
        self.problems: list[Problem] = []
        self._seen = set()
        self._resolving = set()
        self.our_files: dict[str, Path] = {}  # module name -> path (our sources)
        self.file_of_mod: dict[str, str] = {}  # module name -> display path (ours)
        self.positional_bindings: dict[tuple, tuple] = {}  # (file, line, target) -> param names
        self.parse_failures: list[str] = []
        self._ext_attr_cache = {}
        self.checked = set()
        self.imported_modules: set[str] = set()  # megatron modules our sources import
        self.guards: list[tuple] = []  # (base source, attr) from enclosing `if hasattr(base, "attr")`
        self.optional_imports: set[int] = set()  # ids of imports inside try/except ImportError

    # -------------------------------------------------------------- modules
    def module_path(self, mod: str):
        """Path of a module's source, 'namespace' for a directory without __init__, else None."""
        if mod in self.our_files:
            return self.our_files[mod]
        if _is_megatron_module(mod):
            base = self.tree.joinpath(*mod.split("."))
        elif mod == "megatron_dataeff" or mod.startswith("megatron_dataeff."):
            base = self.project.joinpath(*mod.split("."))
        else:
            return None
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.is_dir():
            return "namespace"
        return None

    def parse(self, path: Path):
        if path not in self.asts:
            try:
                self.asts[path] = ast.parse(path.read_text(encoding="utf-8"), str(path))
            except SyntaxError as exc:
                self.parse_failures.append(f"{path}: cannot parse with Python {sys.version.split()[0]}: {exc}")
                self.asts[path] = ast.Module(body=[], type_ignores=[])
        return self.asts[path]

    def module_scope(self, mod: str):
        path = self.module_path(mod)
        if path is None:
            return None
        if path == "namespace":
            key = ("ns", mod)
            if key not in self.scopes:
                self.scopes[key] = Scope(self, mod, ast.Module(body=[], type_ignores=[]), None, "module")
            return self.scopes[key]
        tree = self.parse(path)
        return self.scope_of(tree, mod, None, "module")

    def scope_of(self, node, mod, parent, kind, cls_sym=None):
        key = id(node)
        if key not in self.scopes:
            self.scopes[key] = Scope(self, mod, node, parent, kind, cls_sym)
        return self.scopes[key]

    def is_package(self, mod):
        p = self.module_path(mod)
        return p == "namespace" or (p is not None and p.name == "__init__.py")

    def resolve_relative(self, mod, name, level):
        if not level:
            return name or ""
        parts = mod.split(".")
        if not self.is_package(mod):
            parts = parts[:-1]
        if level > 1:
            parts = parts[: len(parts) - (level - 1)]
        base = ".".join(parts)
        return f"{base}.{name}" if name else base

    def module_sym(self, mod):
        if self.module_path(mod) is not None:
            return Sym("module", mod)
        if _is_megatron_module(mod):
            return None
        return Sym("external", name=mod)

    def lookup(self, mod: str, name: str, exported=False, _depth=0):
        """The Sym `mod.name` (as `from mod import name` would give), or None."""
        if _depth > 30:
            return None
        key = ("lookup", mod, name)
        if key in self._resolving:
            return None
        self._resolving.add(key)
        try:
            scope = self.module_scope(mod)
            if scope is None:
                return None
            if exported and scope.all_names is not None and name not in scope.all_names:
                return None
            if scope.has(name):
                sym = scope.resolve_local(name)
                if sym is not None:
                    return sym
            sub = f"{mod}.{name}"
            if self.module_path(sub) is not None:
                return Sym("module", sub)
            for src in scope.stars:
                sym = self.lookup(src, name, exported=True, _depth=_depth + 1)
                if sym is not None:
                    return sym
            if scope.has(name):  # bound, but to something we cannot follow (e.g. a computed value)
                return Sym("value", mod, name)
            if scope.dynamic:
                return Sym("dynamic", mod, name)
            return None
        finally:
            self._resolving.discard(key)

    def resolve_path(self, path: str):
        """A public dotted path (module[.attr...]) to a Sym; trailing '()' gives an instance."""
        inst = path.endswith("()")
        path = path[:-2] if inst else path
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            mod = ".".join(parts[:i])
            if self.module_path(mod) is not None:
                sym = Sym("module", mod)
                for attr in parts[i:]:
                    sym = self.getattr_sym(sym, attr, None)
                    if sym is None:
                        return None
                if inst and sym.kind == "class":
                    return Sym("inst", sym.mod, sym.name, cls=sym)
                return sym
        return None

    def resolve_binding(self, scope: Scope, name, how, ctx):
        key = ("bind", id(scope), name, id(how))
        if key in self._resolving:
            return None
        self._resolving.add(key)
        try:
            kind = how[0]
            if kind == "unknown":
                return None
            if kind == "self":
                cls = scope.cls_sym
                return cls if how[1] else Sym("inst", cls.mod, cls.name, cls=cls)
            if kind == "def":
                node = how[1]
                qual = self._qualname(scope, node.name)
                if isinstance(node, ast.ClassDef):
                    return Sym("class", scope.mod, qual, node, scope=scope)
                owner = scope.cls_sym if scope.kind == "class" else None
                return Sym("func", scope.mod, qual, node, scope=scope, cls=owner)
            if kind == "module":
                return self.module_sym(how[1])
            if kind == "from":
                src, attr = how[1], how[2]
                if self.module_path(src) is None:
                    return None if _is_megatron_module(src) else Sym("external", name=f"{src}.{attr}")
                return self.lookup(src, attr)
            if kind == "expr":
                return self.eval(how[1], scope, None)
            return None
        finally:
            self._resolving.discard(key)

    def _qualname(self, scope, name):
        parts = [name]
        s = scope
        while s is not None and s.kind != "module":
            parts.append(getattr(s.node, "name", "<lambda>"))
            s = s.parent
        return ".".join(reversed(parts))

    # -------------------------------------------------------------- classes
    def class_scope(self, cls: Sym):
        return self.scope_of(cls.node, cls.mod, cls.scope, "class", cls)

    def class_bases(self, cls: Sym):
        out = []
        for b in cls.node.bases:
            sym = self.eval(b, cls.scope, None)
            if sym is None:
                src = ast.unparse(b)
                sym = Sym("external", name=src) if not src.startswith("megatron") else Sym("dynamic", name=src)
            out.append(sym)
        return out

    def mro(self, cls: Sym):
        out, seen = [], set()

        def visit(c, depth):
            if depth > 40:
                return
            k = (c.kind, c.qual)
            if k in seen:
                return
            seen.add(k)
            out.append(c)
            if c.kind == "class":
                for b in self.class_bases(c):
                    visit(b, depth + 1)

        visit(cls, 0)
        return out

    def is_dataclass(self, cls: Sym):
        return any(n.split(".")[-1] == "dataclass" for n in _decorator_names(cls.node))

    def _dataclass_kw_only(self, cls: Sym):
        for d in cls.node.decorator_list:
            if isinstance(d, ast.Call) and ast.unparse(d.func).split(".")[-1] == "dataclass":
                for k in d.keywords:
                    if k.arg == "kw_only" and isinstance(k.value, ast.Constant) and k.value.value:
                        return True
        return False

    def dataclass_fields(self, cls: Sym):
        """Init fields of a dataclass through its dataclass bases: [(name, required, kw_only)]."""
        fields: dict[str, tuple] = {}
        for c in reversed(self.mro(cls)):
            if c.kind != "class" or not self.is_dataclass(c):
                continue
            kw_only = self._dataclass_kw_only(c)
            for stmt in c.node.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                ann = ast.unparse(stmt.annotation)
                if "ClassVar" in ann:
                    continue
                if ann.split(".")[-1] == "KW_ONLY":
                    kw_only = True
                    continue
                required, init, fkw = stmt.value is None, True, kw_only
                if isinstance(stmt.value, ast.Call) and ast.unparse(stmt.value.func).split(".")[-1] == "field":
                    kws = {k.arg: k.value for k in stmt.value.keywords}
                    required = "default" not in kws and "default_factory" not in kws
                    if "init" in kws and isinstance(kws["init"], ast.Constant) and kws["init"].value is False:
                        init = False
                    if "kw_only" in kws and isinstance(kws["kw_only"], ast.Constant):
                        fkw = bool(kws["kw_only"].value)
                name = stmt.target.id
                if name in fields:
                    old = fields.pop(name)
                    fields[name] = (name, required, fkw, init) if init else old[:3] + (False,)
                else:
                    fields[name] = (name, required, fkw, init)
        return [f for f in fields.values()]

    def init_signature(self, cls: Sym):
        """The signature of calling class `cls`, or None when it cannot be known."""
        for c in self.mro(cls):
            if c.kind == "external":
                if c.name.split(".")[-1] in ("object", "ABC", "Generic", "Protocol", "Enum", "IntEnum"):
                    continue
                return None
            if c.kind != "class":
                return None
            for stmt in c.node.body:
                if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
                    return func_signature(stmt, True, f"{c.qual}.__init__")
            if self.is_dataclass(c):
                params = []
                for name, required, kw_only, init in self.dataclass_fields(c):
                    if init:
                        params.append(Param(name, "kwonly" if kw_only else "pos", required))
                return Signature(params, False, False, f"fields of dataclass {c.qual} and its bases")
        return Signature([], False, False, f"{cls.qual} (object.__init__)")

    def class_members(self, cls: Sym):
        """(names, dynamic): attribute names an instance of cls has, through its MRO."""
        key = ("members", cls.qual, id(cls.node))
        cache = self.__dict__.setdefault("_member_cache", {})
        if key in cache:
            return cache[key]
        names, dynamic = set(), False
        for c in self.mro(cls):
            if c.kind == "external":
                ext = self._external_attrs(c.name)
                if ext is None:
                    if c.name.split(".")[-1] not in ("object", "ABC", "Generic", "Protocol"):
                        dynamic = True
                else:
                    names |= ext
                continue
            if c.kind != "class":
                dynamic = True
                continue
            for stmt, _ in _walk_statements(c.node.body):
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(stmt.name)
                    if stmt.name in ("__getattr__",) and c.is_megatron:
                        dynamic = True
                elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                    for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name):
                                names.add(n.id)
            for n in ast.walk(c.node):
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and \
                        isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                    names.add(n.attr)
                elif isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) and \
                        isinstance(n.args[0].value, str):
                    fn = ast.unparse(n.func)
                    if fn in ("setattr",) and len(n.args) > 1 and isinstance(n.args[1], ast.Constant):
                        names.add(n.args[1].value)
                    elif fn.split(".")[-1] in ("register_buffer", "register_parameter", "add_module") and \
                            fn.startswith("self."):
                        names.add(n.args[0].value)
                if isinstance(n, ast.Call) and ast.unparse(n.func) == "setattr" and len(n.args) > 1 and \
                        isinstance(n.args[0], ast.Name) and n.args[0].id == "self" and \
                        not isinstance(n.args[1], ast.Constant):
                    dynamic = True
        cache[key] = (names, dynamic)
        return names, dynamic

    def _external_attrs(self, dotted):
        """Attribute names of an importable non-megatron class (and of a blank instance), or None."""
        if dotted in self._ext_attr_cache:
            return self._ext_attr_cache[dotted]
        out = None
        parts = dotted.split(".")
        for i in range(len(parts) - 1, 0, -1):
            modname = ".".join(parts[:i])
            if modname.startswith("megatron"):
                break
            try:
                obj = importlib.import_module(modname)
                for p in parts[i:]:
                    obj = getattr(obj, p)
            except Exception:
                continue
            if isinstance(obj, type):
                out = set(dir(obj))
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out |= set(vars(obj()))
                except Exception:
                    pass
            break
        self._ext_attr_cache[dotted] = out
        return out

    def class_member_sym(self, cls: Sym, attr: str, bound: bool):
        """A def/class/value named attr in cls's MRO (a Sym), or None."""
        for c in self.mro(cls):
            if c.kind != "class":
                continue
            cs = self.class_scope(c)
            if cs.has(attr):
                sym = cs.resolve_local(attr)
                if sym is not None:
                    if sym.kind == "func":
                        static = _is_static(sym.node)
                        classm = _is_classmethod(sym.node)
                        sym = Sym("func", sym.mod, sym.name, sym.node, sym.scope, cls=c,
                                  bound=(bound or classm) and not static)
                    return sym
                return Sym("value", c.mod, f"{c.name}.{attr}")
        return None

    # -------------------------------------------------------------- expressions
    def log(self, ctx, line, what):
        """Record a check made (shown with --verbose)."""
        if ctx is not None:
            self.checked.add((ctx, line, what))

    def report(self, ctx, line, msg):
        if ctx is None:
            return
        key = (ctx, line, msg)
        if key not in self._seen:
            self._seen.add(key)
            self.problems.append(Problem(ctx, line, msg))

    def getattr_sym(self, base: Sym, attr: str, ctx, line=0, store=False):
        if base.kind == "module":
            if attr.startswith("__") and attr.endswith("__"):  # __name__, __file__, ...
                return None
            sym = self.lookup(base.mod, attr)
            if sym is not None and ctx is not None and _is_megatron_module(base.mod):
                self.log(ctx, line, f"attribute {base.mod}.{attr}")
            if sym is None and _is_megatron_module(base.mod):
                verb = "assigns" if store else "uses"
                self.report(ctx, line, f"{verb} {base.mod}.{attr}: module {base.mod} has no attribute {attr!r}")
            return sym
        if base.kind == "external":
            return Sym("external", name=f"{base.name}.{attr}")
        if base.kind in ("class", "inst", "super"):
            cls = base if base.kind == "class" else base.cls
            if base.kind == "super":
                candidates = [b for b in self.class_bases(cls)]
                for b in candidates:
                    if b.kind == "class":
                        sym = self.class_member_sym(b, attr, True)
                        if sym is not None:
                            return sym
                megatron_bases = [b for b in candidates if b.is_megatron]
                if megatron_bases:
                    self.report(ctx, line, f"super().{attr}: no {attr!r} in {megatron_bases[0].qual} or its bases")
                return None
            sym = self.class_member_sym(cls, attr, base.kind == "inst")
            if cls.is_megatron or base.kind == "super":
                self.log(ctx, line, f"attribute {cls.qual}.{attr}")
            if sym is not None:
                return sym
            if base.kind == "inst":
                names, dynamic = self.class_members(cls)
                if attr in names:
                    return self._instance_attr_type(cls, attr)
            else:
                names, dynamic = self.class_members(cls)
                if attr in names:
                    return None
            if dynamic or attr.startswith("__"):
                return None
            meg = [c for c in self.mro(cls) if c.kind == "class" and c.is_megatron]
            if meg:
                what = "instance of " if base.kind == "inst" else ""
                self.report(ctx, line, f"{'assigns' if store else 'uses'} .{attr} on {what}{cls.qual}: "
                                       f"not defined in {meg[0].qual} or its bases")
            return None
        if base.kind == "multi":
            return None
        return None

    def _instance_attr_type(self, cls: Sym, attr: str):
        """For our own classes: the type of `self.attr` from its assignments (first resolvable)."""
        key = ("iattr", cls.qual, attr)
        if key in self._resolving:
            return None
        self._resolving.add(key)
        try:
            for c in self.mro(cls):
                if c.kind != "class" or c.is_megatron:
                    continue
                for fn in c.node.body:
                    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    for n in ast.walk(fn):
                        if isinstance(n, ast.Assign) and len(n.targets) == 1:
                            t = n.targets[0]
                            if isinstance(t, ast.Attribute) and t.attr == attr and \
                                    isinstance(t.value, ast.Name) and t.value.id == "self":
                                fscope = self.func_scope(fn, c)
                                sym = self.eval(n.value, fscope, None)
                                if sym is not None:
                                    return sym
            return None
        finally:
            self._resolving.discard(key)

    def func_scope(self, fn, owner_cls: Sym | None, parent=None):
        if parent is None:
            parent = owner_cls.scope if owner_cls is not None else None
            while parent is not None and parent.kind == "class":
                parent = parent.parent
        return self.scope_of(fn, owner_cls.mod if owner_cls else parent.mod, parent, "func", owner_cls)

    def eval(self, expr, scope: Scope, ctx):
        """The Sym an expression evaluates to, or None; reports missing megatron attributes to ctx."""
        if isinstance(expr, ast.Name):
            if expr.id == "super":
                return Sym("external", name="builtins.super")
            return scope.lookup(expr.id, ctx)
        if isinstance(expr, ast.Attribute):
            base = self.eval(expr.value, scope, ctx)
            if base is None:
                return None
            if ctx is not None and (ast.unparse(expr.value), expr.attr) in self.guards:
                ctx = None  # version-guarded by `if hasattr(base, "attr")`
            return self.getattr_sym(base, expr.attr, ctx, expr.lineno, isinstance(expr.ctx, ast.Store))
        if isinstance(expr, ast.Call):
            f = self.eval(expr.func, scope, ctx)
            if f is None:
                return None
            if f.kind == "external" and f.name == "builtins.super":
                cls = self._enclosing_class(scope)
                return Sym("super", cls.mod, cls.name, cls=cls) if cls is not None else None
            return self.call_result(f)
        if isinstance(expr, ast.Await):
            return None
        return None

    def _enclosing_class(self, scope):
        s = scope
        while s is not None:
            if s.kind == "func" and s.cls_sym is not None:
                return s.cls_sym
            s = s.parent
        return None

    def call_result(self, f: Sym):
        if f.kind == "class":
            return Sym("inst", f.mod, f.name, cls=f)
        if f.kind == "func":
            for path, results in self.returns_table().items():
                if path is not None and path.qual == f.qual:
                    syms = results
                    if len(syms) == 1:
                        return syms[0]
                    return Sym("multi", items=syms)
            if not f.is_megatron:
                return self._our_return_type(f)
        return None

    def returns_table(self):
        if not hasattr(self, "_returns"):
            self._returns = {}
            for k, vs in RETURNS.items():
                ks = self.resolve_path(k)
                if ks is None:
                    continue
                self._returns[ks] = [s for s in (self.resolve_path(v) for v in vs) if s is not None]
        return {k: v for k, v in self._returns.items()}

    def _our_return_type(self, f: Sym):
        key = ("ret", f.qual, id(f.node))
        if key in self._resolving or not isinstance(f.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return None
        self._resolving.add(key)
        try:
            fscope = self.func_scope(f.node, f.cls, parent=f.scope if f.scope.kind != "class" else None)
            if f.node.returns is not None:
                ann = f.node.returns
                if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
                    try:
                        ann = ast.parse(ann.value, mode="eval").body
                    except SyntaxError:
                        return None
                sym = self.eval(ann, f.scope, None)
                if sym is not None and sym.kind == "class":
                    return Sym("inst", sym.mod, sym.name, cls=sym)
                return None
            for n in _own_nodes(f.node):
                if isinstance(n, ast.Return) and n.value is not None:
                    sym = self.eval(n.value, fscope, None)
                    if sym is not None:
                        return sym
            return None
        finally:
            self._resolving.discard(key)

    # -------------------------------------------------------------- calls
    def signature_of(self, f: Sym, _depth=0):
        if f.kind == "class":
            return self.init_signature(f)
        if f.kind == "func" and isinstance(f.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sig = func_signature(f.node, f.bound, f.qual)
            if sig.varargs and sig.varkw and not sig.params and _depth < 5:
                # def f(*args, **kwargs) under @copy_signature(g) / @functools.wraps(g): g's signature
                for d in f.node.decorator_list:
                    if isinstance(d, ast.Call) and d.args and \
                            ast.unparse(d.func).split(".")[-1] in ("copy_signature", "wraps"):
                        g = self.eval(d.args[0], f.scope, None)
                        if g is not None and g.kind in ("func", "class"):
                            inner = self.signature_of(g, _depth + 1)
                            if inner is not None:
                                return Signature(inner.params, inner.varargs, inner.varkw,
                                                 f"{f.qual} = signature of {inner.where}")
            return sig
        return None

    def check_call(self, call: ast.Call, f: Sym, scope: Scope, ctx, target_desc=None, positional=()):
        sig = self.signature_of(f)
        if sig is None:
            return
        desc = target_desc or (f.qual if f.kind == "func" else f"{f.qual}()")
        line = call.lineno
        self.log(ctx, line, f"call {desc}")
        npos = sum(1 for a in call.args if not isinstance(a, ast.Starred))
        star = any(isinstance(a, ast.Starred) for a in call.args)
        kws = [(k.arg, k.value.lineno, ctx, "") for k in call.keywords if k.arg is not None]
        partial = star
        for k in call.keywords:
            if k.arg is None:
                keys, complete = self.dict_keys(k.value, scope)
                partial = partial or not complete
                kws += [(name, ln, file, f", passed as **{ast.unparse(k.value)} at {ctx}:{line}")
                        for name, (file, ln) in keys.items()]
        pos_params = sig.positional()
        if npos > len(pos_params) and not sig.varargs:
            self.report(ctx, line, f"{desc} takes {len(pos_params)} positional argument(s), we pass {npos} "
                                   f"({sig.where})")
        bound_names = [p.name for p in pos_params[:npos]]
        if positional:
            want = tuple(positional[:npos])
            got = tuple(bound_names[: len(want)])
            if got != want and not (sig.varargs and len(got) < len(want)):
                self.report(ctx, line, f"{desc}: our positional arguments mean {want}, but the parameters there "
                                       f"are now {got} ({sig.where})")
        else:
            self.positional_bindings[(ctx, line, desc)] = tuple(bound_names)
        names = {p.name: p for p in sig.params}
        given = set(bound_names)
        for name, ln, where, via in kws:
            p = names.get(name)
            if p is None or p.kind == "posonly":
                if not sig.varkw:
                    self.report(where, ln, f"{desc} has no parameter {name!r} ({sig.where}{via})")
            elif name in given and name in bound_names:
                self.report(where, ln, f"{desc}: {name!r} is given positionally and by keyword ({sig.where}{via})")
            given.add(name)
        if not partial:
            missing = [p.name for p in sig.params if p.required and p.name not in given]
            if missing:
                self.report(ctx, line, f"{desc} requires {', '.join(map(repr, missing))}, which we do not pass "
                                       f"({sig.where})")

    def dict_keys(self, expr, scope: Scope):
        """({key: (file, line)}, complete) of a dict built in the enclosing function."""
        keys, complete = {}, True
        if isinstance(expr, ast.Dict) or (isinstance(expr, ast.Call) and ast.unparse(expr.func) == "dict"):
            return self._literal_keys(expr, scope.mod)
        if not isinstance(expr, ast.Name):
            return keys, False
        s = scope
        while s is not None and expr.id not in s.bindings:
            s = s.parent
        if s is None:
            return keys, False
        for how in s.bindings[expr.id]:
            if how[0] != "expr":
                return keys, False
            k, c = self._literal_keys(how[1], s.mod)
            keys.update(k)
            complete = complete and c
        body = s.node
        for n in _own_nodes(body):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "update" and \
                    isinstance(n.func.value, ast.Name) and n.func.value.id == expr.id:
                for k in n.keywords:
                    if k.arg is None:
                        complete = False
                    else:
                        keys[k.arg] = (self.file_of_mod.get(s.mod, s.mod), k.value.lineno)
                for a in n.args:
                    if isinstance(a, (ast.Dict, ast.Call)) and (isinstance(a, ast.Dict) or
                                                                 ast.unparse(a.func) == "dict"):
                        k2, c2 = self._literal_keys(a, s.mod)
                    elif isinstance(a, ast.Call):
                        k2, c2 = self._returned_dict_keys(a, s)
                    else:
                        k2, c2 = {}, False
                    keys.update(k2)
                    complete = complete and c2
            elif isinstance(n, ast.Assign) and any(
                    isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == expr.id
                    for t in n.targets):
                for t in n.targets:
                    if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant):
                        keys[t.slice.value] = (self.file_of_mod.get(s.mod, s.mod), t.lineno)
                    else:
                        complete = False
        return keys, complete

    def _literal_keys(self, expr, mod):
        file = self.file_of_mod.get(mod, mod)
        keys, complete = {}, True
        if isinstance(expr, ast.Dict):
            for k in expr.keys:
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    keys[k.value] = (file, k.lineno)
                else:
                    complete = False
        elif isinstance(expr, ast.Call) and ast.unparse(expr.func) == "dict":
            if expr.args:
                complete = False
            for k in expr.keywords:
                if k.arg is None:
                    complete = False
                else:
                    keys[k.arg] = (file, k.value.lineno)
        else:
            complete = False
        return keys, complete

    def _returned_dict_keys(self, call, scope):
        f = self.eval(call.func, scope, None)
        if f is None or f.kind != "func" or f.is_megatron:
            return {}, False
        keys, complete, found = {}, True, False
        for n in _own_nodes(f.node):
            if isinstance(n, ast.Return) and n.value is not None:
                found = True
                k, c = self._literal_keys(n.value, f.mod)
                keys.update(k)
                complete = complete and c
        return keys, complete and found

    # -------------------------------------------------------------- our files
    def analyse_file(self, display: str, mod: str):
        tree = self.parse(self.our_files[mod])
        for t in ast.walk(tree):  # imports a `try: ... except ImportError` makes optional
            if isinstance(t, ast.Try) and any(
                    h.type is None or any(n in ast.unparse(h.type) for n in
                                          ("ImportError", "ModuleNotFoundError", "Exception"))
                    for h in t.handlers):
                for st in t.body:
                    for n in ast.walk(st):
                        if isinstance(n, (ast.Import, ast.ImportFrom)):
                            self.optional_imports.add(id(n))
        mscope = self.scope_of(tree, mod, None, "module")
        self._visit_body(tree, mscope, display)

    def _visit_body(self, node, scope: Scope, ctx):
        for child in ast.iter_child_nodes(node):
            self._visit(child, scope, ctx)

    def _visit(self, node, scope: Scope, ctx):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for d in getattr(node, "decorator_list", []):
                self._visit(d, scope, ctx)
            for d in [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]:
                self._visit(d, scope, ctx)
            owner = scope.cls_sym if scope.kind == "class" else None
            parent = scope
            while parent.kind == "class":
                parent = parent.parent
            fscope = self.scope_of(node, scope.mod, parent, "func", owner)
            body = node.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else [node.body]
            for stmt in body:
                self._visit(stmt, fscope, ctx)
            return
        if isinstance(node, ast.ClassDef):
            for b in [*node.bases, *node.decorator_list]:
                self._visit(b, scope, ctx)
            cls = Sym("class", scope.mod, self._qualname(scope, node.name), node, scope=scope)
            cscope = self.scope_of(node, scope.mod, scope, "class", cls)
            for stmt in node.body:
                self._visit(stmt, cscope, ctx)
            return
        if isinstance(node, (ast.If, ast.IfExp, ast.BoolOp)) or (
                isinstance(node, ast.Call) and ast.unparse(node.func) == "hasattr"):
            pairs = self._hasattr_pairs(node.test if isinstance(node, (ast.If, ast.IfExp)) else node)
            if pairs:
                self.guards.extend(pairs)
                try:
                    if isinstance(node, (ast.If, ast.IfExp)):
                        self._visit(node.test, scope, ctx)
                        for st in (node.body if isinstance(node, ast.If) else [node.body]):
                            self._visit(st, scope, ctx)
                    else:
                        for child in ast.iter_child_nodes(node):
                            self._visit(child, scope, ctx)
                finally:
                    del self.guards[len(self.guards) - len(pairs):]
                if isinstance(node, (ast.If, ast.IfExp)):
                    for st in (node.orelse if isinstance(node, ast.If) else [node.orelse]):
                        self._visit(st, scope, ctx)
                return
        if isinstance(node, ast.ImportFrom) and id(node) in self.optional_imports:
            return
        if isinstance(node, ast.ImportFrom):
            src = self.resolve_relative(scope.mod, node.module, node.level)
            if _is_megatron_module(src):
                if self.module_path(src) is None:
                    self.report(ctx, node.lineno, f"imports from {src}: no such module in the tree")
                else:
                    for al in node.names:
                        self.log(ctx, node.lineno, f"import {src}.{al.name}")
                        if al.name != "*" and self.lookup(src, al.name) is None:
                            self.report(ctx, node.lineno, f"imports {al.name} from {src}: not defined there")
                self.imported_modules.add(src)
            return
        if isinstance(node, ast.Import):
            for al in node.names:
                if _is_megatron_module(al.name):
                    if self.module_path(al.name) is None:
                        self.report(ctx, node.lineno, f"imports {al.name}: no such module in the tree")
                    self.imported_modules.add(al.name)
            return
        if isinstance(node, ast.Attribute):
            self.eval(node, scope, ctx)
        if isinstance(node, ast.Call):
            f = self.eval(node.func, scope, ctx)
            if f is not None:
                self._check_any_call(node, f, scope, ctx)
        for child in ast.iter_child_nodes(node):
            self._visit(child, scope, ctx)

    @staticmethod
    def _hasattr_pairs(test):
        """(base source, attr) of every `hasattr(base, "attr")` in a condition."""
        out = []
        for n in ast.walk(test):
            if isinstance(n, ast.Call) and ast.unparse(n.func) == "hasattr" and len(n.args) == 2 and \
                    isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str):
                out.append((ast.unparse(n.args[0]), n.args[1].value))
        return out

    def _check_any_call(self, node, f, scope, ctx):
        if f.kind == "multi":
            for alt in f.items:
                if alt.kind in ("func", "class"):
                    self.check_call(node, alt, scope, ctx)
            return
        if f.kind in ("func", "class") and f.is_megatron:
            self.check_call(node, f, scope, ctx)
        elif f.kind == "class" and any(c.kind == "class" and c.is_megatron for c in self.mro(f)[1:]):
            # one of our classes on a megatron base: its init is checked when it is megatron's
            sig_owner = next((c for c in self.mro(f) if c.kind == "class" and (
                any(isinstance(s, ast.FunctionDef) and s.name == "__init__" for s in c.node.body)
                or self.is_dataclass(c))), None)
            if sig_owner is not None and (sig_owner.is_megatron or self.is_dataclass(sig_owner)):
                self.check_call(node, f, scope, ctx, target_desc=f"{f.name}() (on {sig_owner.qual})")

    # -------------------------------------------------------------- hand lists
    def check_hand_lists(self, display_to_mod):
        for h in HAND_ATTRS:
            line = self._hand_line(h)
            if line is None:
                continue
            classes = h.cls if isinstance(h.cls, list) else [h.cls]
            attrs = list(h.attrs)
            for a in list(attrs):
                if a.startswith("@dict-keys:"):
                    attrs.remove(a)
                    attrs += self._global_dict_keys(h.file, a.split(":", 1)[1], display_to_mod)
            for cpath in classes:
                cls = self.resolve_path(cpath)
                if cls is None or cls.kind != "class":
                    self.report(h.file, line, f"{cpath}: no such class in the tree (needed for "
                                              f"{', '.join(attrs)})")
                    continue
                names, dynamic = self.class_members(cls)
                for a in attrs:
                    self.log(h.file, line, f"hand attribute {cpath}.{a}")
                    if a not in names and self.class_member_sym(cls, a, True) is None and not dynamic:
                        soft = " (our access is guarded, so this silently changes behaviour)" if h.soft else ""
                        self.report(h.file, line, f"{cpath} has no attribute {a!r}{soft}")
        for h in HAND_FIELD_TYPES:
            found = self._hand_target(h, h.cls, "class")
            if found is None:
                continue
            line, cls = found
            ann = self._field_annotation(cls, h.field)
            self.log(h.file, line, f"hand field type {h.cls}.{h.field}: {ann}")
            if self._hand_handled(h):
                continue
            if ann is None:
                self.report(h.file, line, f"{h.cls} has no field {h.field!r}")
            elif h.mentions not in ann:
                self.report(h.file, line, f"{h.cls}.{h.field} is now `{ann}`, not a {h.mentions}: {h.why}")
        for h in HAND_SOURCE_REFS:
            found = self._hand_target(h, h.func, "func")
            if found is None:
                continue
            line, fn = found
            if self._hand_handled(h):
                self.log(h.file, line, f"hand source reference {h.func}: handled in {h.file}")
                continue
            roots = [fn.node]
            if h.toplevel:  # statements not nested in if/for/while/try/with blocks
                roots = [st for st in fn.node.body if not isinstance(
                    st, (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.FunctionDef, ast.ClassDef))]
            idents = set()
            for r in roots:
                idents |= {n.id for n in ast.walk(r) if isinstance(n, ast.Name)}
                idents |= {n.attr for n in ast.walk(r) if isinstance(n, ast.Attribute)}
            self.log(h.file, line, f"hand source reference {h.func} {'->' if h.present else '-/->'} {h.ident}")
            if h.present and h.ident not in idents:
                self.report(h.file, line, f"{h.func} no longer uses {h.ident}: {h.why}")
            elif not h.present and h.ident in idents:
                self.report(h.file, line, f"{h.func} now uses {h.ident}: {h.why}")
        for h in HAND_CALLS:
            targets = h.target if isinstance(h.target, list) else [h.target]
            if h.callee.startswith("@kw:"):
                kw = h.callee[4:]
                line = self._find_line(h.file, f'"{kw}"')
                if line is None:
                    self.report(h.file, 0, f"hand list stale: no line mentions {kw!r}")
                    continue
                for t in targets:
                    sym = self.resolve_path(t.rsplit(".", 1)[0])
                    if sym is None:
                        self.report(h.file, line, f"{t}: not found in the tree")
                        continue
                    sig = self.init_signature(sym)
                    if sig is not None and kw not in {p.name for p in sig.params} and not sig.varkw:
                        self.report(h.file, line, f"{t} has no parameter {kw!r} ({sig.where})")
                continue
            mod = display_to_mod[h.file]
            calls = self._find_calls(mod, h.callee, h.contains)
            if not calls:
                self.report(h.file, 0, f"hand list stale: no call of {h.callee}(...{h.contains}...)")
                continue
            for call, scope in calls:
                for t in targets:
                    sym = self.resolve_path(t)
                    if sym is None or sym.kind != "func":
                        self.report(h.file, call.lineno, f"calls {t}: not found in the tree")
                        continue
                    sym = Sym("func", sym.mod, sym.name, sym.node, sym.scope, sym.cls, bound=h.bound)
                    self.check_call(call, sym, scope, h.file, target_desc=t, positional=h.positional)

    def _field_annotation(self, cls, name):
        for c in self.mro(cls):
            if c.kind != "class":
                continue
            for stmt in c.node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                        stmt.target.id == name:
                    return ast.unparse(stmt.annotation)
        return None

    def _global_dict_keys(self, file, name, display_to_mod):
        tree = self.parse(self.our_files[display_to_mod[file]])
        for stmt in tree.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    keys, _ = self._literal_keys(stmt.value, "")
                    return list(keys)
        return []

    def _hand_line(self, h) -> "int | None":
        """The line of ours a hand-list entry stands for, or None after reporting the entry as stale."""
        line = self._find_line(h.file, h.snippet)
        if line is None:
            self.report(h.file, 0, f"hand list stale: no line contains {h.snippet!r}")
        return line

    def _hand_target(self, h, path, kind):
        """(our line, megatron's `kind` symbol at `path`) of a hand-list entry, or None after reporting why."""
        line = self._hand_line(h)
        if line is None:
            return None
        sym = self.resolve_path(path)
        if sym is None or sym.kind != kind:
            self.report(h.file, line, f"{path}: no such {'function' if kind == 'func' else kind} in the tree")
            return None
        return line, sym

    def _hand_handled(self, h) -> bool:
        """Whether our file already handles the change the entry watches for (its `unless` text is there,
        or its `only_if` text, what we relied on, is gone)."""
        text = (self.project / h.file).read_text()
        only_if = getattr(h, "only_if", "")
        return bool((h.unless and h.unless in text) or (only_if and only_if not in text))

    def _find_line(self, file, snippet):
        for i, text in enumerate((self.project / file).read_text().splitlines(), 1):
            if snippet in text:
                return i
        return None

    def _find_calls(self, mod, callee, contains):
        tree = self.parse(self.our_files[mod])
        src = self.our_files[mod].read_text()
        out = []
        mscope = self.scope_of(tree, mod, None, "module")

        def walk(node, scope):
            for child in ast.iter_child_nodes(node):
                s = scope
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    s = self.scopes.get(id(child), scope)
                if isinstance(child, ast.Call) and ast.unparse(child.func) == callee:
                    seg = ast.get_source_segment(src, child) or ""
                    if contains in seg:
                        out.append((child, scope))
                walk(child, s)

        walk(tree, mscope)
        return out

    # -------------------------------------------------------------- import-time dependencies
    def import_closure_externals(self, roots):
        """{external top-level package: (megatron module, line)} imported unguarded at module level by
        the modules `roots` (and their parent packages), transitively."""
        todo, seen, ext = [], set(), {}
        self.import_parent = {}

        def add(mod, parent=None):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                m = ".".join(parts[:i])
                if m not in seen and self.module_path(m) is not None:
                    seen.add(m)
                    todo.append(m)
                    self.import_parent[m] = parent

        for r in roots:
            add(r)
        while todo:  # breadth first: the chains shown are shortest
            mod = todo.pop(0)
            path = self.module_path(mod)
            if path == "namespace":
                continue
            tree = self.parse(path)
            for stmt, guarded in _walk_unguarded(tree.body):
                if guarded:
                    continue
                if isinstance(stmt, ast.Import):
                    names = [(al.name, al.name) for al in stmt.names]
                elif isinstance(stmt, ast.ImportFrom):
                    src = self.resolve_relative(mod, stmt.module, stmt.level)
                    names = [(src, f"{src}.{al.name}") for al in stmt.names]
                else:
                    continue
                for src, full in names:
                    if _is_megatron_module(src):
                        add(src, mod)
                        if self.module_path(full) is not None:
                            add(full, mod)
                    elif src and src.split(".")[0] not in sys.stdlib_module_names:
                        ext.setdefault(src.split(".")[0], (mod, stmt.lineno))
        return ext

    def import_chain(self, mod):
        chain = [mod]
        while self.import_parent.get(chain[-1]) and len(chain) < 50:
            chain.append(self.import_parent[chain[-1]])
        return " <- ".join(chain)


def _walk_unguarded(body, guarded=False):
    """Module-level statements; guarded inside try (with handlers) or `if TYPE_CHECKING` / other ifs."""
    for stmt in body:
        yield stmt, guarded
        if isinstance(stmt, ast.If):  # a conditional import (TYPE_CHECKING, version tests) may not run
            yield from _walk_unguarded(stmt.body, True)
            yield from _walk_unguarded(stmt.orelse, True)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            g = guarded or bool(stmt.handlers)
            yield from _walk_unguarded(stmt.body, g)
            for h in stmt.handlers:
                yield from _walk_unguarded(h.body, True)
            yield from _walk_unguarded(stmt.orelse, g)
            yield from _walk_unguarded(stmt.finalbody, guarded)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _walk_unguarded(stmt.body, guarded)


def _own_nodes(fn):
    """Nodes of a function body, not descending into nested defs / classes / lambdas."""
    stack = list(fn.body) if hasattr(fn, "body") and isinstance(fn.body, list) else []
    while stack:
        n = stack.pop()
        yield n
        for c in ast.iter_child_nodes(n):
            if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                stack.append(c)


def find_tree(path: Path) -> Path:
    """The directory holding `megatron/core` for a path given on the command line."""
    path = path.resolve()
    for cand in (path, path.parent, path.parent.parent):
        if (cand / "megatron" / "core").is_dir():
            return cand
    sys.exit(f"{path}: no megatron/core/ found there (give the directory holding megatron/)")


def our_modules(project: Path):
    out = {}
    for pattern in OUR_SOURCES:
        for p in sorted(project.glob(pattern)):
            if p.name == "check_megatron_api.py":
                continue
            rel = p.relative_to(project)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def analyse(tree: Path, project: Path = PROJECT):
    an = Analyzer(tree, project)
    an.our_files = our_modules(project)
    display_to_mod = {}
    for mod, p in an.our_files.items():
        display = str(p.relative_to(project))
        an.file_of_mod[mod] = display
        display_to_mod[display] = mod
    for mod, p in an.our_files.items():
        an.analyse_file(an.file_of_mod[mod], mod)
    an.check_hand_lists(display_to_mod)
    return an


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", type=Path, help="directory holding megatron/core (e.g. an unzipped wheel)")
    ap.add_argument("--baseline", type=Path, help="a tree our code is known to work with: also report "
                                                   "positional arguments that bind to other parameters now")
    ap.add_argument("--no-deps", action="store_true", help="skip the import-time dependency check")
    ap.add_argument("--project", type=Path, default=PROJECT, help="our project root (default: this checkout)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every check made")
    args = ap.parse_args(argv)
    an = analyse(find_tree(args.tree), args.project.resolve())
    if args.verbose:
        for file, line, what in sorted(an.checked):
            print(f"checked {file}:{line}: {what}")
        print(f"{len(an.checked)} checks")
    problems = list(an.problems)
    if args.baseline:
        base = analyse(find_tree(args.baseline), args.project.resolve())
        for key, names in an.positional_bindings.items():
            old = base.positional_bindings.get(key)
            if old is not None and old != names:
                problems.append(Problem(key[0], key[1], f"{key[2]}: positional arguments bound to {old} in the "
                                                        f"baseline, to {names} now"))
    notes = []
    if not args.no_deps:
        ext = an.import_closure_externals(sorted(an.imported_modules))
        chains = {pkg: an.import_chain(mod) for pkg, (mod, _) in ext.items()}
        core = an.import_closure_externals(["megatron.core"])
        for pkg, (mod, line) in sorted(ext.items()):
            if importlib.util.find_spec(pkg) is None:
                if pkg in core:
                    mod, line = core[pkg]
                    where, chain = "`import megatron.core` itself fails", an.import_chain(mod)
                else:
                    where, chain = "importing our megatron modules fails", chains[pkg]
                notes.append(f"import-time dependency {pkg!r} is not installed in this environment, so {where}: "
                             f"imported unguarded at {mod}:{line}, reached by {chain}")
    problems.sort(key=lambda p: (p.file, p.line, p.msg))
    for f in an.parse_failures:
        print(f"warning: {f}")
    if not problems and not notes:
        print("OK")
        return 0
    for p in problems:
        print(p)
    for n in notes:
        print(n)
    return 1


if __name__ == "__main__":
    sys.exit(main())
