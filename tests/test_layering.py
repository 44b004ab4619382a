"""The package's imports run one way (README "Layout"): no cycle, and no module imports a layer above its own."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_dataeff"

# Layer of each top-level module or subpackage; a module may import its own layer and those below.
LAYERS = {
    "__init__": 0, "errors": 0, "atomic": 0, "lazy": 0, "platform": 0, "deferred_compile": 0,
    "data": 1, "ops": 1, "objectives": 1, "entry": 1,
    "config": 2,
    "models": 3,
    "arguments": 4,
    "distributed": 5, "checkpoint": 5,
    "training": 6, "inference": 6, "evaluation": 6,  # the trainer validates with evaluation's validator
    "export": 7,
    "experiments": 8,
}
# Files that stand alone (shipped inside every diffusion export, next to the model's weights): any layer reads them.
STANDALONE = {"export.modeling_dataeff_mdm", "export.configuration_dataeff_mdm"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        out[name] = path
    return out


def _imports(path: Path, modules) -> list[tuple[str, bool]]:
    """(imported package module, at module level) of one file."""
    found = []
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_dataeff"):
            base = node.module[len("megatron_dataeff"):].lstrip(".") or "__init__"
            names = [f"{base}.{a.name}" if base != "__init__" else a.name for a in node.names]
            targets = [n for n in names if n in modules] or [base]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("megatron_dataeff"):].lstrip(".") or "__init__" for a in node.names
                       if a.name.startswith("megatron_dataeff")]
        else:
            continue
        found += [(t, id(node) in top_level) for t in targets if t in modules]
    return found


def _layer(module: str) -> int:
    return 0 if module in STANDALONE else LAYERS[module.split(".")[0]]


def test_every_module_has_a_layer():
    """A new top-level module or subpackage is placed in a layer (here and in the README) before it lands."""
    assert {m.split(".")[0] for m in _modules()} <= set(LAYERS)


def test_module_level_imports_never_go_up():
    """A module-level import reaches its own layer or a lower one (deferred imports of optional heavy parts
    inside functions are allowed, but no cycle: the next test)."""
    modules = _modules()
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, path in modules.items() for t, top in _imports(path, modules)
              if top and _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_and_nothing_below_training_imports_it():
    """No cycle among the package's modules, counting imports inside functions too; config, data, ops,
    objectives, models, checkpoint, inference, evaluation and export never import training/."""
    modules = _modules()
    graph = {m: {t for t, _ in _imports(path, modules) if t != m} for m, path in modules.items()}
    below = ("config", "data", "ops", "objectives", "models", "checkpoint", "distributed", "inference", "evaluation",
             "export")
    into_training = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
                     if t.startswith("training") and m.split(".")[0] in below]
    assert not into_training, into_training
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, cycles
