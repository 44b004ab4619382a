"""The embedded default corpus: English docstrings of the Python standard library.

Every machine with Python has it, so the quickstart and the tests need no download.  Each stdlib
module (tests and vendored packages excluded) becomes one document: its module, class and
function docstrings joined by blank lines, in source order; modules are taken in sorted path order.
The documents are tokenized once and cached as a Megatron indexed dataset
(`{cache}/{python}-{tokenizer}/stdlib_docstrings_text_document.bin/.idx`); the cache directory is
published by an atomic rename, so a killed build never leaves a half-written corpus behind.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

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


def build_corpus(tokenizer: Tokenizer, out_dir: Path) -> str:
    """Tokenize the corpus into `out_dir` (append EOD); returns the dataset prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(out_dir / f"{CORPUS_NAME}_text_document")
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    names = []
    for name, text in iter_documents():
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
        names.append(name)
    if not names:
        raise RuntimeError("found no stdlib docstrings for the embedded corpus")
    builder.finalize(prefix + ".idx")
    with open(out_dir / "documents.json", "w") as f:
        json.dump({"documents": names, "tokenizer": tokenizer.metadata()}, f)
    return prefix


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
