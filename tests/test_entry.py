"""The tools' shared frame (megatron_dataeff/entry.py): a UserError is one line and an exit status, a bug keeps its
traceback, and every tool in tools/ runs in the frame without catching broad exception types itself."""

from __future__ import annotations

import ast
import contextlib
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

from megatron_dataeff.entry import tool_main
from megatron_dataeff.errors import ConfigError, DataError, OutputExistsError, PathNotFoundError, UserError

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").glob("*.py"))
BROAD = {"BaseException", "Exception", "ValueError", "KeyError", "LookupError", "RuntimeError", "OSError",
         "IOError", "EnvironmentError", "TypeError"}


def test_a_user_error_is_one_line_and_exit_2(capsys):
    """A UserError escaping main prints `error: <message>` as the only stderr line and returns 2."""

    @tool_main
    def main(argv=None) -> int:
        print("started")
        raise DataError(f"--input {argv[0]}: no such file")

    assert main(["data/x"]) == 2
    out, err = capsys.readouterr()
    assert out == "started\n"
    assert err == "error: --input data/x: no such file\n"


def test_the_exit_status_of_a_user_error_can_be_the_tools_own(capsys):
    """Tools that documented exit 1 for bad input keep it; a clean return passes through."""

    @tool_main(user_error_exit=1)
    def main(fail: bool) -> int:
        if fail:
            raise ConfigError("--tokens must be positive")
        return 0

    assert main(False) == 0
    assert main(True) == 1
    assert capsys.readouterr().err == "error: --tokens must be positive\n"


@pytest.mark.parametrize("error", [ValueError("bad shape"), KeyError("weight"), RuntimeError("boom"),
                                   OSError("disk"), ZeroDivisionError()])
def test_any_other_exception_propagates_with_its_traceback(capsys, error):
    """Anything that is not a UserError is a bug: it leaves main unchanged, traceback included."""

    def deep():
        raise error

    @tool_main
    def main() -> int:
        deep()
        return 0

    with pytest.raises(type(error)) as info:
        main()
    assert info.value is error
    assert "deep" in [frame.name for frame in traceback.extract_tb(info.tb)]
    assert capsys.readouterr().err == ""


def test_file_errors_that_name_the_users_path_are_user_errors():
    """The path errors are UserErrors and still the built-in types callers catch."""
    assert issubclass(PathNotFoundError, UserError) and issubclass(PathNotFoundError, FileNotFoundError)
    assert issubclass(OutputExistsError, UserError) and issubclass(OutputExistsError, FileExistsError)
    assert str(PathNotFoundError("--hf-dir x: no config.json")) == "--hf-dir x: no config.json"


def test_optional_accelerator_warnings_are_silenced():
    """megatron-core's import-time warnings about transformer-engine / apex are not shown; others are."""

    @tool_main
    def main() -> int:
        warnings.warn("Transformer Engine is not installed")
        warnings.warn("Apex is not installed")
        warnings.warn("something else")
        return 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main() == 0
    assert [str(w.message) for w in caught] == ["something else"]


def test_process_group_wraps_the_body_and_is_closed_before_the_error_is_printed(monkeypatch, capsys):
    """process_group=True runs main inside owned_process_group(), which is left (torn down) even when a
    UserError ends main; tools without it do not import torch.distributed's helpers at all."""
    from megatron_dataeff import distributed

    events = []

    @contextlib.contextmanager
    def fake_group():
        events.append("enter")
        try:
            yield
        finally:
            events.append("exit")

    monkeypatch.setattr(distributed, "owned_process_group", fake_group)

    @tool_main(process_group=True)
    def main() -> int:
        events.append("body")
        raise ConfigError("--view ar or --view mdm")

    assert main() == 2
    assert events == ["enter", "body", "exit"]
    assert capsys.readouterr().err == "error: --view ar or --view mdm\n"


def _main_is_framed(path: Path) -> bool:
    """Whether the file's `main` is decorated with tool_main, or is imported from a module whose main is."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            names = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
            return any(isinstance(n, ast.Name) and n.id == "tool_main" for n in names)
        if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names):
            module = ROOT / (node.module.replace(".", "/") + ".py")
            return module.exists() and _main_is_framed(module)
    return False


def _broad_handlers(path: Path) -> list[str]:
    """`file:line except X` of every handler that catches a broad type (or everything)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ExceptHandler):
            continue
        caught = [] if node.type is None else (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type])
        names = [c.id if isinstance(c, ast.Name) else c.attr if isinstance(c, ast.Attribute) else "?" for c in caught]
        if node.type is None or BROAD & set(names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} except {', '.join(names) or '(everything)'}")
    return found


def test_every_tool_runs_in_the_frame_and_catches_no_broad_type():
    """Each tools/*.py main goes through tool_main, and no tool (nor the preprocessing CLI two tools are)
    catches ValueError, KeyError, RuntimeError, OSError, Exception or the like to print it."""
    assert TOOLS
    assert [p.name for p in TOOLS if not _main_is_framed(p)] == []
    files = TOOLS + [ROOT / "megatron_dataeff" / "data" / "preprocess_cli.py"]
    assert [h for p in files for h in _broad_handlers(p)] == []


def test_a_tool_reports_bad_input_in_one_line(tmp_path):
    """End to end: a tool given a dataset that is not there prints one `error:` line and its exit status."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "dataset_stats.py"), "--input",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'missing'}.idx: no such file"]
