"""Our use of megatron-core's API (imports, attributes, call signatures) against the installed release, read
with `ast` by scripts/check_megatron_api.py, and that check catching mismatches planted in a copy of our sources."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANTED_KEYWORD = "no_such_keyword_"


@pytest.fixture(scope="module")
def api():
    """scripts/check_megatron_api.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("check_megatron_api", ROOT / "scripts" / "check_megatron_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def installed_tree() -> Path:
    """The directory holding the installed megatron/core (site-packages); megatron.core is not imported."""
    origin = importlib.util.find_spec("megatron.core").origin  # megatron/core/__init__.py
    return Path(origin).parents[2]


@pytest.fixture(scope="module")
def installed_check(api, installed_tree):
    # The import-time dependency check is left out: this suite imports our megatron modules for real.
    return api.check(installed_tree, deps=False)


def test_our_use_of_megatron_core_matches_the_installed_release(installed_check):
    """Every megatron-core import, attribute and call our sources make exists in the installed release as we use it."""
    lines, an = installed_check
    assert not lines, "scripts/check_megatron_api.py found mismatches:\n" + "\n".join(lines)
    files = {file for file, _, _ in an.checked}
    # The check made checks over our sources (a wrong project root or tree would check nothing and pass).
    assert len(an.checked) > 200 and len(files) > 20, f"only {len(an.checked)} checks in {len(files)} files"


def _copy_sources(api, dest: Path) -> None:
    for path in api.our_modules(api.PROJECT).values():
        target = dest / path.relative_to(api.PROJECT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _call_to_break(an):
    """(our file, call) of a call of megatron's that passes arguments, to a callee without **kwargs."""
    for file, call, desc, sig in an.calls:
        if file.startswith("megatron_dataeff/") and not sig.varkw and (call.args or call.keywords) \
                and not any(isinstance(a, ast.GeneratorExp) for a in call.args):
            return file, call, desc
    raise AssertionError("no call of megatron's with arguments and a fixed signature in megatron_dataeff/")


def _imported_module(an) -> str:
    """A megatron module our sources import names from (one without a module `__getattr__`, which answers any name)."""
    for _, _, what in sorted(an.checked):
        if what.startswith("import "):
            module = what.split()[1].rsplit(".", 1)[0]
            if not an.module_scope(module).dynamic:
                return module
    raise AssertionError("our sources import no name from megatron")


def _add_keyword(path: Path, call: ast.Call) -> int:
    """Add `no_such_keyword_=None` after the call's last argument; the line it lands on."""
    last = max([*call.args, *call.keywords], key=lambda n: (n.end_lineno, n.end_col_offset))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    raw = lines[last.end_lineno - 1].encode()  # ast's columns count UTF-8 bytes
    raw = raw[:last.end_col_offset] + f", {PLANTED_KEYWORD}=None".encode() + raw[last.end_col_offset:]
    lines[last.end_lineno - 1] = raw.decode()
    path.write_text("".join(lines), encoding="utf-8")
    return last.end_lineno


def test_planted_mismatches_are_reported(api, installed_tree, installed_check, tmp_path):
    """Mismatches planted in a copy of our sources (keyword, import, attributes off a `GPTModel`) are each reported."""
    # A keyword added to a real call; a name megatron does not define; attributes megatron lacks on a parameter
    # annotated GPTModel, directly and through `decoder` and `config` (typed by megatron's own code).
    real, an = installed_check
    project = tmp_path / "project"
    _copy_sources(api, project)
    file, call, desc = _call_to_break(an)
    keyword_line = _add_keyword(project / file, call)
    module = _imported_module(an)
    text = (project / file).read_text(encoding="utf-8")
    first = text.count("\n") + 3
    (project / file).write_text(text + (
        f"\n\nfrom {module} import no_such_name_\n"
        "from megatron.core.models.gpt import GPTModel as _PlantedModel\n\n\n"
        "def _planted(model: _PlantedModel):\n"
        "    return model.no_such_attr_, model.decoder.no_such_attr_, model.config.no_such_field_\n"),
        encoding="utf-8")

    lines, _ = api.check(installed_tree, project=project, deps=False)

    new = [line for line in lines if line not in real]  # the edits move no line of a real mismatch
    expected = [(f"{file}:{keyword_line}: {desc} has no parameter '{PLANTED_KEYWORD}'", ""),
                (f"{file}:{first}: imports no_such_name_ from {module}: not defined there", ""),
                (f"{file}:{first + 5}: uses .no_such_attr_ on instance of ", ".GPTModel: not defined in"),
                (f"{file}:{first + 5}: uses .no_such_attr_ on instance of ", ".TransformerBlock: not defined in"),
                (f"{file}:{first + 5}: uses .no_such_field_ on instance of ", ".TransformerConfig: not defined in")]
    for start, then in expected:
        assert any(line.startswith(start) and then in line for line in new), \
            f"not reported: {start}...{then}\nreported:\n" + "\n".join(new)
    assert len(new) == len(expected), "reported beyond the planted mismatches:\n" + "\n".join(new)
