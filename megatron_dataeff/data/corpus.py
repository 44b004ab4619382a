"""The embedded default corpus: English docstrings of the Python standard library.

Every machine with Python has it, so the quickstart and the tests need no download.  Each stdlib
module (tests and vendored packages excluded) becomes one document: its module, class and
function docstrings joined by blank lines, in source order; modules are taken in sorted path order.
The documents are tokenized once and cached as a Megatron indexed dataset
(`{cache}/{python}-{tokenizer}/stdlib_docstrings_text_document.bin/.idx`); the cache directory is
published by an atomic rename, so a killed build never leaves a half-written corpus behind.  The
build goes through the same path as any user corpus: JSONL, then `data/preprocess.py` (the engine
of `tools/preprocess_data.py`) with `--append-eod`; `tools/build_corpus.py` runs it by hand.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_dataeff.data.tokenizers import Tokenizer

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
              "ensurepip", "turtledemo"}
CORPUS_NAME = "stdlib_docstrings"
MIN_DOCUMENT_CHARS = 200


def default_cache_dir() -> Path:
    """$MEGATRON_DATAEFF_CACHE, else ~/.cache/megatron_dataeff."""
    env = os.environ.get("MEGATRON_DATAEFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megatron_dataeff"


def iter_documents(stdlib_dir: str | None = None) -> Iterator[tuple[str, str]]:
    """(module path, text) of each stdlib module with enough docstring text."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / name
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc:
                        parts.append(doc.strip())
            text = "\n\n".join(parts)
            if len(text) >= MIN_DOCUMENT_CHARS:
                yield str(path.relative_to(root)), text


def _corpus_key(tokenizer: Tokenizer) -> str:
    meta = json.dumps(tokenizer.metadata(), sort_keys=True)
    version = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return f"{version}-{tokenizer.tokenizer_type}-{hashlib.sha256(meta.encode()).hexdigest()[:10]}"


def write_jsonl(path: str | Path, stdlib_dir: str | None = None) -> int:
    """Write the corpus as JSONL (`{"text": ..., "source": module path}` per line); returns documents."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for name, text in iter_documents(stdlib_dir):
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        raise RuntimeError("found no stdlib docstrings for the embedded corpus")
    return n


def build_corpus(tokenizer: Tokenizer, out_dir: Path) -> str:
    """Tokenize the corpus into `out_dir` through the preprocess pipeline (JSONL -> `--append-eod`
    -> indexed dataset), exactly as `tools/preprocess_data.py` would; returns the dataset prefix."""
    from megatron_dataeff.data.preprocess import preprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{CORPUS_NAME}.jsonl"
    write_jsonl(jsonl)
    summary = preprocess([str(jsonl)], str(out_dir / CORPUS_NAME), tokenizer, json_keys=("text",),
                         append_eod=True, workers=1, log_stream=io.StringIO())
    return summary.outputs["text"]


def embedded_corpus(tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> str:
    """The cached corpus prefix for this tokenizer, built on first use (atomically)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / _corpus_key(tokenizer)
    prefix = final / f"{CORPUS_NAME}_text_document"
    if Path(str(prefix) + ".idx").exists():
        return str(prefix)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build_corpus(tokenizer, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process published it first; theirs is as good as ours.
            if not Path(str(prefix) + ".idx").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(prefix)
