#!/usr/bin/env python
"""Static check of megatron_dataeff's use of megatron-core against an unpacked megatron-core source tree.

    python scripts/check_megatron_api.py /tmp/mcore_src/0.19.2 [--baseline /tmp/mcore_src/0.16.1]

The tree is a directory holding `megatron/core/...` (an unzipped wheel, a Megatron-LM checkout or a
site-packages directory).  Nothing of megatron is imported: both our sources and megatron's are read
with `ast` (what megatron's classes inherit from torch.nn.Module, enum.Enum, ... is read from those
packages' sources the same way).  Prints `OK` or one line per mismatch (`our_file:line: what is
missing`); exits 1 on any.  tests/test_megatron_api.py runs it against the installed megatron-core.

What it checks, derived from our sources (megatron_dataeff/, pretrain_diffusion.py, tools/, benchmarks/; not
tests/, which run against the installed megatron-core and so check what they use themselves):

* every `import megatron...` / `from megatron... import name`: the module file exists and `name` is
  defined in it (def, class, assignment, import / re-export, star import, or a submodule);
* every attribute read or assigned on something known to be a megatron object: a module
  (`parallel_state.get_..._rank`, `mrandom._get_cuda_rng_state = ...`), a class (`AttnMaskType.no_mask`),
  an instance of a megatron class (or of one of our subclasses, through `self` / `super()`), known from
  - a call of the class (`StaticInferenceContext(...)`) or of a function with a return annotation
    (`get_megatron_optimizer(...) -> MegatronOptimizer`; ours without one: what it returns),
  - an annotation of ours or megatron's: a parameter (`model: GPTModel`), a variable
    (`attn: SelfAttention = ...`), `T | None`, `list[T]` (its items, in `for` loops and `[0]`),
    `tuple[A, B]` (unpacked `a, b = f()`),
  - an attribute whose assignments in the class's methods agree (`self.decoder = TransformerBlock(...)`,
    `self.config = config` with `config: TransformerConfig`), megatron's classes included, so chains
    such as `model.decoder.layers` and `model.config.kv_channels` are followed;
* every call of such a callable: each keyword argument we pass is a parameter (or the callee takes
  **kwargs), no more positional arguments than it takes, and no required parameter left out.
  Class calls check `__init__` through the MRO, or for dataclasses the init fields including
  inherited ones (`field(init=False)`, `ClassVar`, `KW_ONLY` respected); our own dataclass
  subclasses (`DataEffTransformerConfig(TransformerConfig)`) add their fields.  Calling an instance
  checks megatron's `forward` (nn.Module's __call__) or `__call__`.  `**kwargs` built as
  `kwargs = dict(...)` / `kwargs.update(...)` (also from one of our functions returning a dict
  literal, e.g. `platform.cpu_config_overrides()`, or a module-level dict of ours such as
  `**FAMILY_OPTIONS`) are expanded key by key;
* unguarded top-level third-party imports that importing our megatron modules pulls in (transitively)
  and that are not installed in this Python environment.

What an annotation cannot say and no test catches is in the one hand-written list below, HAND_NAMES:
keys of a dict of ours that must be attributes of a megatron class because our code reads them by
name (`hasattr`).  An entry whose dict is gone or no longer readable is reported, so the list cannot
rot silently.  Receivers still unknown (the model the schedule hands to our forward step, a layer
built by `build_module`, `get_cuda_rng_tracker()`) are used by the test suite for real; annotate
such a receiver to have it checked here too.

With --baseline, calls passing positional arguments are also compared: a positional argument that
binds to a differently named parameter in TREE than in the baseline is reported (a reordered
signature).  Code our sources guard is not reported: imports inside `try/except ImportError` and
attributes inside `if hasattr(obj, "attr")`.  --project points at another checkout of ours (e.g. a
copy with a change to try); -v lists every check made.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
_PARSED: dict = {}  # (path, mtime, size) -> (ast.Module, parse failure or None)
OUR_SOURCES = ["megatron_dataeff/**/*.py", "pretrain_diffusion.py", "tools/*.py", "benchmarks/*.py"]

# ----------------------------------------------------------------------------------------------------
# The hand-written part: what neither our sources show the checker nor a test catches.


@dataclass
class HandNames:
    """Every key of the module-level dict `name` in our `file` must be an attribute of megatron's class
    `cls` (a public import path, resolved in the tree): `why` says what our code does with the keys."""

    file: str
    name: str
    cls: str
    why: str


HAND_NAMES: list[HandNames] = [
    # Empty: the one entry it had (hf_mapping.REQUIRED_MEGATRON_OPTIONS, the model family's TransformerConfig
    # options) is protected by a real test against every supported megatron-core instead
    # (tests/test_model_family.py::test_family_defaults_are_megatron_cores_defaults), so the family table is
    # written as the code needs it, not as this checker can read it.
]

# ----------------------------------------------------------------------------------------------------
# Symbols


@dataclass(eq=False)
class Sym:
    kind: str  # module | class | func | value | external | dynamic | inst | super | seq | tuple
    mod: str = ""  # module of definition (module: its name)
    name: str = ""  # qualified name inside mod; external: dotted name
    node: object = None
    scope: object = None  # class/func: the scope it was defined in
    cls: object = None  # func: owning class Sym (methods); inst/super: the class Sym
    bound: bool = False  # func reached through an instance
    items: list = field(default_factory=list)  # seq: [the element]; tuple: each item (None: unknown)

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
                elif getattr(p, "annotation", None) is not None:
                    self._bind(p.arg, ("ann", p.annotation, False, "outer"))
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
                    if isinstance(stmt, ast.AnnAssign):  # `x: T` / `x: T = v`: the annotation first
                        self._bind(t.id, ("ann", stmt.annotation, guarded))
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
                elif isinstance(t, ast.Tuple) and getattr(stmt, "value", None) is not None and \
                        all(isinstance(e, ast.Name) for e in t.elts):  # a, b = f(): f's tuple, item by item
                    for i, e in enumerate(t.elts):
                        self._bind(e.id, ("unpack", stmt.value, guarded, i))
                else:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            self._bind(n.id, ("unknown",))
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            if isinstance(stmt.target, ast.Name):  # an element of what is iterated
                self._bind(stmt.target.id, ("iter", stmt.iter, guarded))
            else:
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
    if how[0] in ("def", "module", "expr", "ann", "iter", "unpack"):
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
        self._other_sources = None  # _OtherSources: installed packages other than megatron, read with ast
        self.checked = set()  # (our file, line, what was checked)
        self.calls: list[tuple] = []  # (our file, ast.Call, callee, Signature) of every call checked
        self.imported_modules: set[str] = set()  # megatron modules our sources import
        self.guards: list[tuple] = []  # (base source, attr) from enclosing `if hasattr(base, "attr")`
        self.optional_imports: set[int] = set()  # ids of imports inside try/except ImportError

    # -------------------------------------------------------------- modules
    def module_path(self, mod: str):
        """Path of a module's source, 'namespace' for a directory without __init__, else None."""
        cache = self.__dict__.setdefault("_path_cache", {})
        if mod not in cache:
            cache[mod] = self._module_path(mod)
        return cache[mod]

    def _module_path(self, mod: str):
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
            st = path.stat()
            key = (path, st.st_mtime_ns, st.st_size)
            if key not in _PARSED:  # shared by analyses in one process (--baseline, the tests)
                try:
                    _PARSED[key] = ast.parse(path.read_text(encoding="utf-8"), str(path)), None
                except SyntaxError as exc:
                    failure = f"{path}: cannot parse with Python {sys.version.split()[0]}: {exc}"
                    _PARSED[key] = ast.Module(body=[], type_ignores=[]), failure
            self.asts[path], failure = _PARSED[key]
            if failure:
                self.parse_failures.append(failure)
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
            if kind == "ann":  # a parameter's annotation is evaluated in the scope enclosing the def
                return self.annotation_type(how[1], scope.parent if how[3:] == ("outer",) else scope)
            if kind == "unpack":
                tup = self.eval(how[1], scope, None)
                ok = tup is not None and tup.kind == "tuple" and how[3] < len(tup.items)
                return tup.items[how[3]] if ok else None
            if kind == "iter":
                seq = self.eval(how[1], scope, None)
                return seq.items[0] if seq is not None and seq.kind == "seq" else None
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
                elif isinstance(n, ast.Call) and n.args:
                    fn, args = ast.unparse(n.func), n.args
                    if fn in ("setattr", "object.__setattr__") and len(args) > 1 and \
                            ast.unparse(args[0]) in ("self", "cls"):
                        args = args[1:]  # setattr(self, "name", value)
                    elif not (fn.endswith("__setattr__") or fn.split(".")[-1] in (
                            "register_buffer", "register_parameter", "add_module") and fn.startswith("self.")):
                        args = []
                    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                        names.add(args[0].value)
                # A dataclass declares its attributes: a computed setattr in one (megatron-core 0.19's
                # TransformerConfig.__post_init__ moves deprecated options onto other fields) sets a field.
                # Taken otherwise, every read off a TransformerConfig would pass unchecked; an attribute such a
                # setattr did add would be reported, not missed.
                if isinstance(n, ast.Call) and ast.unparse(n.func) == "setattr" and len(n.args) > 1 and \
                        isinstance(n.args[0], ast.Name) and n.args[0].id == "self" and \
                        not isinstance(n.args[1], ast.Constant) and (c.is_megatron or self.is_ours(c.mod)) and \
                        not self.is_dataclass(c):
                    dynamic = True  # (torch.nn.Module's load_state_dict setattr()s parameters only)
        cache[key] = (names, dynamic)
        return names, dynamic

    def _external_attrs(self, dotted):
        """Attribute names of a class from outside megatron and our sources (torch.nn.Module, enum.Enum,
        a builtin), read from its package's source like megatron's, or None when unknown."""
        if dotted not in self._ext_attr_cache:
            out = _builtin_attrs(dotted)
            if out is None:
                if self._other_sources is None:
                    self._other_sources = _OtherSources(self.tree, self.project)
                sym = self._other_sources.resolve_path(dotted)
                if sym is not None and sym.kind == "class":
                    names, dynamic = self._other_sources.class_members(sym)
                    out = None if dynamic else names
            self._ext_attr_cache[dotted] = out
        return self._ext_attr_cache[dotted]

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
            meg = [c for c in self.mro(cls) if c.kind == "class" and c.is_megatron]
            if meg:
                self.log(ctx, line, f"attribute {cls.qual}.{attr}")
            if sym is not None:
                return sym
            if base.kind == "inst":
                sym = self._instance_attr_type(cls, attr)
                if sym is not None:
                    return sym
            if not meg or attr.startswith("__"):
                return None
            names, dynamic = self.class_members(cls)
            if attr in names or dynamic:
                return None
            what = "instance of " if base.kind == "inst" else ""
            self.report(ctx, line, f"{'assigns' if store else 'uses'} .{attr} on {what}{cls.qual}: "
                                   f"not defined in {meg[0].qual} or its bases")
            return None
        return None

    def _instance_attr_type(self, cls: Sym, attr: str):
        """The type of `self.attr` of an instance of cls (ours or megatron's), from what the methods of
        its classes assign to it (`self.decoder = TransformerBlock(...)`, `self.config = config` with
        `config: TransformerConfig`, `self.x: T = ...`; `self.x = None` aside): when every one is known
        and they agree on one class, or all derive from one of them, that class; otherwise unknown."""
        key = ("iattr", cls.qual, attr)
        cache = self.__dict__.setdefault("_iattr_cache", {})
        if key in cache:
            return cache[key]
        if key in self._resolving:
            return None
        self._resolving.add(key)
        try:
            found = []
            for c in self.mro(cls):
                if c.kind != "class":
                    continue
                for fn, value, ann in self._self_assignments(c).get(attr, ()):
                    if ann is None and isinstance(value, ast.Constant) and value.value is None:
                        continue  # `self.x = None` until it is set
                    fscope = self.func_scope(fn, c)
                    sym = self.annotation_type(ann, fscope) if ann is not None else None
                    if sym is None and value is not None:
                        sym = self.eval(value, fscope, None)
                    found.append(sym)
            out = self._common_type(found) if None not in found else None  # one unknown: unknown
        finally:
            self._resolving.discard(key)
        cache[key] = out
        return out

    def _self_assignments(self, c: Sym):
        """{attr: [(method node, value, annotation)]} of the `self.attr = value` statements in c's methods."""
        cache = self.__dict__.setdefault("_assign_cache", {})
        key = id(c.node)
        if key not in cache:
            out = {}
            for fn in c.node.body:
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for n in _own_nodes(fn):
                    if isinstance(n, ast.Assign) and len(n.targets) == 1:
                        t, value, ann = n.targets[0], n.value, None
                    elif isinstance(n, ast.AnnAssign):
                        t, value, ann = n.target, n.value, n.annotation
                    else:
                        continue
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        out.setdefault(t.attr, []).append((fn, value, ann))
            cache[key] = out
        return cache[key]

    def _common_type(self, syms):
        """One type for all of syms (instances or lists of instances): the one they share or derive
        from, else None."""
        if not syms or any(s.kind not in ("inst", "seq") for s in syms):
            return None
        if any(s.kind == "seq" for s in syms):
            if not all(s.kind == "seq" for s in syms):
                return None
            elt = self._common_type([s.items[0] for s in syms])
            return Sym("seq", items=[elt]) if elt is not None else None
        for cand in syms:
            if all(any(c.kind == "class" and c.qual == cand.qual for c in self.mro(s.cls)) for s in syms):
                return cand
        return None

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
        if isinstance(expr, ast.Subscript):  # an element of a list or tuple of known objects
            base = self.eval(expr.value, scope, ctx)
            if base is not None and base.kind == "seq" and not isinstance(expr.slice, ast.Slice):
                return base.items[0]
            if base is not None and base.kind == "tuple" and isinstance(expr.slice, ast.Constant) and \
                    isinstance(expr.slice.value, int) and -len(base.items) <= expr.slice.value < len(base.items):
                return base.items[expr.slice.value]
            return None
        if isinstance(expr, ast.Tuple) and not any(isinstance(e, ast.Starred) for e in expr.elts):
            return Sym("tuple", items=[self.eval(e, scope, ctx) for e in expr.elts])
        if isinstance(expr, ast.List) and expr.elts:  # [DistributedDataParallel(...)]
            elts = [self.eval(e, scope, ctx) for e in expr.elts]
            if all(e is not None and e.kind == "inst" for e in elts) and len({e.qual for e in elts}) == 1:
                return Sym("seq", items=[elts[0]])
            return None
        return None

    def annotation_type(self, ann, scope: Scope):
        """What an annotation says a value is: an instance (`T`, `T | None`, `Optional[T]`, a string),
        a list of instances (`list[T]`, `Sequence[T]`, `tuple[T, ...]`), or None."""
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            try:
                ann = ast.parse(ann.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
            parts = [a for a in (ann.left, ann.right) if not (isinstance(a, ast.Constant) and a.value is None)]
            return self.annotation_type(parts[0], scope) if len(parts) == 1 else None
        if isinstance(ann, ast.Subscript):
            outer = ast.unparse(ann.value).split(".")[-1]
            args = list(ann.slice.elts) if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            args = [a for a in args if not (isinstance(a, ast.Constant) and a.value in (None, Ellipsis))]
            if outer in ("Optional", "Union", "Annotated") and args:
                return self.annotation_type(args[0], scope) if len(args) == 1 or outer == "Annotated" else None
            variadic = isinstance(ann.slice, ast.Tuple) and len(ann.slice.elts) == 2 and \
                isinstance(ann.slice.elts[1], ast.Constant) and ann.slice.elts[1].value is Ellipsis
            if outer in ("tuple", "Tuple") and not variadic:  # tuple[A, B]: item by item
                elts = list(ann.slice.elts) if isinstance(ann.slice, ast.Tuple) else [ann.slice]
                return Sym("tuple", items=[self.annotation_type(a, scope) for a in elts])
            if outer in ("list", "List", "Sequence", "MutableSequence", "Iterable", "Iterator", "tuple",
                         "Tuple") and len(args) == 1:
                elt = self.annotation_type(args[0], scope)
                return Sym("seq", items=[elt]) if elt is not None and elt.kind == "inst" else None
            return None
        sym = self.eval(ann, scope, None)
        return Sym("inst", sym.mod, sym.name, cls=sym) if sym is not None and sym.kind == "class" else None

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
        if f.kind == "func" and (f.is_megatron or self.is_ours(f.mod)):
            return self._return_type(f)
        return None

    def is_ours(self, mod: str) -> bool:
        return mod in self.our_files or mod == "megatron_dataeff" or mod.startswith("megatron_dataeff.")

    def _return_type(self, f: Sym):
        """What a function returns: its return annotation; for ours without one, what its first
        `return x` evaluates to."""
        key = ("ret", f.qual, id(f.node))
        if key in self._resolving or not isinstance(f.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return None
        self._resolving.add(key)
        try:
            if f.node.returns is not None:
                scope = f.scope
                while scope is not None and scope.kind == "class":
                    scope = scope.parent
                return self.annotation_type(f.node.returns, scope)
            if f.is_megatron:
                return None
            fscope = self.func_scope(f.node, f.cls, parent=f.scope if f.scope.kind != "class" else None)
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

    def check_call(self, call: ast.Call, f: Sym, scope: Scope, ctx, target_desc=None):
        sig = self.signature_of(f)
        if sig is None:
            return
        desc = target_desc or (f.qual if f.kind == "func" else f"{f.qual}()")
        line = call.lineno
        self.log(ctx, line, f"call {desc}")
        if ctx is not None:
            self.calls.append((ctx, call, desc, sig))
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
            if how[0] == "from" and self.is_ours(how[1]):  # a dict of another module of ours
                k, c = self._module_dict_keys(how[1], how[2])
            elif how[0] == "expr":
                k, c = self._literal_keys(how[1], s.mod)
            else:
                return keys, False
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

    def _module_dict_keys(self, mod, name, _depth=0):
        """_literal_keys of the module-level dict `name` of our module `mod` (followed through imports)."""
        scope = self.module_scope(mod) if _depth < 10 else None
        hows = scope.bindings.get(name, []) if scope is not None else []
        if len(hows) != 1:
            return {}, False
        how = hows[0]
        if how[0] == "expr":
            return self._literal_keys(how[1], mod, _depth + 1)
        if how[0] == "from" and self.is_ours(how[1]):
            return self._module_dict_keys(how[1], how[2], _depth + 1)
        return {}, False

    def _literal_keys(self, expr, mod, _depth=0):
        file = self.file_of_mod.get(mod, mod)
        keys, complete = {}, True
        if isinstance(expr, ast.Dict):
            for k, v in zip(expr.keys, expr.values):
                if k is None and isinstance(v, ast.Name):  # {**OTHER, ...}: OTHER a module-level dict
                    k2, c2 = self._module_dict_keys(mod, v.id, _depth)
                    keys.update(k2)
                    complete = complete and c2
                elif isinstance(k, ast.Constant) and isinstance(k.value, str):
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
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"):
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
        if f.kind == "inst":  # model(...): megatron's __call__, or a module's forward via nn.Module.__call__
            call = self.class_member_sym(f.cls, "__call__", True)
            if call is None or not call.is_megatron:
                fwd = self.class_member_sym(f.cls, "forward", True)
                call = fwd if fwd is not None and any(c.kind == "external" for c in self.mro(f.cls)) else call
            if call is not None and call.kind == "func" and call.is_megatron:
                self.check_call(node, call, scope, ctx)
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

    # -------------------------------------------------------------- hand list
    def check_hand_names(self, display_to_mod):
        for h in HAND_NAMES:
            mod = display_to_mod.get(h.file)
            scope = self.module_scope(mod) if mod is not None else None
            hows = [how for how in (scope.bindings.get(h.name, []) if scope else []) if how[0] == "expr"]
            if not hows:
                self.report(h.file, 0, f"hand list stale: no module-level {h.name} = {{...}} here")
                continue
            line = hows[0][1].lineno
            keys, complete = self._literal_keys(hows[0][1], mod)
            if not complete:
                self.report(h.file, line, f"hand list: cannot read every key of {h.name} (a literal dict, "
                                          f"or **NAME of one, is needed)")
            cls = self.resolve_path(h.cls)
            if cls is None or cls.kind != "class":
                self.report(h.file, line, f"{h.cls}: no such class in the tree")
                continue
            names, dynamic = self.class_members(cls)
            for key in keys:
                self.log(h.file, line, f"hand list: {h.cls}.{key}")
                if key not in names and self.class_member_sym(cls, key, True) is None and not dynamic:
                    self.report(h.file, line, f"{h.cls} has no attribute {key!r}: {h.why}")

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


class _OtherSources(Analyzer):
    """Resolves classes of other installed packages from their sources (found with find_spec, which
    imports nothing for a top-level name), so that what megatron's classes inherit from torch.nn.Module
    or enum.Enum is known without importing torch."""

    def __init__(self, tree: Path, project: Path):
        super().__init__(tree, project)
        self._roots = {}

    def _module_path(self, mod: str):
        path = super()._module_path(mod)
        if path is not None or _is_megatron_module(mod) or self.is_ours(mod):
            return path
        top, *rest = mod.split(".")
        if top not in self._roots:
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            root = None
            if spec is not None and spec.submodule_search_locations:
                root = Path(list(spec.submodule_search_locations)[0])
            elif spec is not None and spec.origin and spec.origin.endswith(".py"):
                root = Path(spec.origin)
            self._roots[top] = root
        root = self._roots[top]
        if root is None or root.suffix == ".py":
            return root if root is not None and not rest else None
        base = root.joinpath(*rest)
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
        return None  # compiled modules (torch._C) stay unknown

    def _external_attrs(self, dotted):
        return _builtin_attrs(dotted)


def _builtin_attrs(dotted):
    """dir() of a builtin class (`dict`, `object`, `builtins.Exception`), else None."""
    import builtins

    name = dotted[len("builtins."):] if dotted.startswith("builtins.") else dotted
    obj = getattr(builtins, name, None) if "." not in name else None
    return set(dir(obj)) if isinstance(obj, type) else None


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
    an.check_hand_names(display_to_mod)
    return an


def check(tree: Path, project: Path = PROJECT, baseline: Path | None = None, deps: bool = True):
    """(mismatch lines, the analysis) of the sources of `project` against the megatron-core tree `tree`
    (the directory holding megatron/core); no lines: OK.  `an.checked` holds every check made."""
    an = analyse(find_tree(tree), project.resolve())
    problems = list(an.problems)
    if baseline is not None:
        base = analyse(find_tree(baseline), project.resolve())
        for key, names in an.positional_bindings.items():
            old = base.positional_bindings.get(key)
            if old is not None and old != names:
                problems.append(Problem(key[0], key[1], f"{key[2]}: positional arguments bound to {old} in the "
                                                        f"baseline, to {names} now"))
    notes = []
    if deps:
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
    return [str(p) for p in problems] + notes, an


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", type=Path, help="directory holding megatron/core (e.g. an unzipped wheel)")
    ap.add_argument("--baseline", type=Path, help="a tree our code is known to work with: also report "
                                                   "positional arguments that bind to other parameters now")
    ap.add_argument("--no-deps", action="store_true", help="skip the import-time dependency check")
    ap.add_argument("--project", type=Path, default=PROJECT, help="our project root (default: this checkout)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every check made")
    args = ap.parse_args(argv)
    lines, an = check(args.tree, args.project, args.baseline, deps=not args.no_deps)
    if args.verbose:
        for file, line, what in sorted(an.checked):
            print(f"checked {file}:{line}: {what}")
        print(f"{len(an.checked)} checks")
    for f in an.parse_failures:
        print(f"warning: {f}")
    print("\n".join(lines) if lines else "OK")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
