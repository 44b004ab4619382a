"""Input files for `preprocess`: which files, in which format, and the blocks of work they are read into.

Inputs are files, globs or directories (a `datasets.Dataset.save_to_disk` directory gives its .arrow
files); each file's format comes from its name (`.gz` looked through) or `--input-format`. `iter_blocks`
reads them in input order into `Block`s: JSONL as raw bytes in ~0.5 MiB blocks of whole lines (parsed by
the workers), plain text one document per file, Parquet and Arrow in blocks of rows. A `Piece` is a file,
or for uncompressed JSONL a byte range of whole lines of it (a partition's share, see `partitions`).
"""

from __future__ import annotations

import functools
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_dataeff.errors import UserError

INPUT_FORMATS = ("jsonl", "text", "parquet", "arrow")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text",
               ".md": "text", ".parquet": "parquet", ".arrow": "arrow"}
BLOCK_BYTES = 512 * 1024
ROWS_PER_BLOCK = 2048


class PreprocessError(UserError, RuntimeError):
    """Bad input or arguments; the message names the file (and line) at fault."""


def format_of(path: str) -> Optional[str]:
    """Input format implied by the file name (`.gz` looked through), or None."""
    name = path[:-3] if path.endswith(".gz") else path
    return _EXTENSIONS.get(os.path.splitext(name)[1].lower())


def _hf_dataset_files(directory: str) -> Optional[list[str]]:
    """The .arrow files of a `datasets.Dataset.save_to_disk` directory, in order; None if it is not one."""
    state = os.path.join(directory, "state.json")
    if os.path.isfile(state):
        with open(state) as f:
            files = [d["filename"] for d in json.load(f).get("_data_files", [])]
        return [os.path.join(directory, name) for name in files]
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        with open(os.path.join(directory, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise PreprocessError(f"{directory} is a DatasetDict; point --input at one split: "
                              + ", ".join(os.path.join(directory, s) for s in splits))
    return None


def resolve_inputs(patterns, input_format: Optional[str] = None) -> list[tuple[str, str]]:
    """(path, format) of every input file: files, globs (sorted) and directories (walked, sorted)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise PreprocessError(f"--input-format must be one of {INPUT_FORMATS}, got {input_format!r}")
    found: list[tuple[str, str]] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            arrow = _hf_dataset_files(pattern)
            if arrow is not None:
                found += [(p, "arrow") for p in arrow]
                continue
            paths = []
            for dirpath, dirnames, filenames in os.walk(pattern):
                dirnames.sort()
                paths += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
            paths = [p for p in paths if format_of(p) is not None]
        elif any(ch in pattern for ch in "*?["):
            paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            paths = [pattern] if os.path.isfile(pattern) else []
        if not paths:
            raise PreprocessError(f"no input files match {pattern}")
        for p in paths:
            fmt = input_format or format_of(p) or "jsonl"
            found.append((p, fmt))
    return found


def open_text(path: str):
    """A text stream of a plain or gzipped UTF-8 file."""
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


@dataclass
class Block:
    """One unit of work: raw JSONL lines, whole text files, or rows of a table."""

    kind: str  # "jsonl" | "text" | "rows"
    path: str
    first: int  # line (jsonl) or row (rows) number of the first record, 1-based
    data: object  # bytes | list[bytes] | dict[key, list]
    progress: int = 0  # input bytes consumed once this block is done (over all files)
    line_origin: int = 0  # > 0: `first` counts lines from this byte offset of the file, not from its start


@dataclass
class Piece:
    """A file, or for uncompressed JSONL a byte range of whole lines of it."""

    path: str
    fmt: str
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file

    def size(self) -> int:
        end = os.path.getsize(self.path) if self.end is None else self.end
        return end - self.start


@functools.lru_cache(maxsize=64)
def lines_before(path: str, offset: int) -> int:
    """Newlines in the first `offset` bytes of `path` (for error messages of a partition's blocks)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(1 << 24, offset))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def _iter_jsonl(piece: Piece, base: int, block_bytes: int) -> Iterator[Block]:
    path, start, end = piece.path, piece.start, piece.end
    raw = open(path, "rb")
    try:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        if start:
            raw.seek(start)
        line, rest = 1, b""
        while True:
            want = block_bytes if end is None else min(block_bytes, end - raw.tell())
            try:
                data = stream.read(want) if want > 0 else b""
            except (OSError, EOFError) as exc:  # a corrupt gzip stream
                raise PreprocessError(f"{path}: cannot read: {exc}") from exc
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            blob, rest = data[:cut + 1], data[cut + 1:]
            yield Block("jsonl", path, line, blob, base + raw.tell() - start, start)
            line += blob.count(b"\n")
        if rest:
            yield Block("jsonl", path, line, rest, base + raw.tell() - start, start)
    finally:
        raw.close()


def _iter_text_files(paths: list[str], bases: list[int], block_bytes: int) -> Iterator[Block]:
    batch, size = [], 0
    for path, base in zip(paths, bases):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
        batch.append((path, data))
        size += len(data)
        if size >= block_bytes:
            yield Block("text", path, 1, batch, base + os.path.getsize(path))
            batch, size = [], 0
    if batch:
        yield Block("text", batch[-1][0], 1, batch, bases[-1] + os.path.getsize(batch[-1][0]))


def _iter_table(path: str, fmt: str, keys: list[str], base: int, rows_per_block: int) -> Iterator[Block]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PreprocessError(f"{path}: reading {fmt} needs pyarrow (pip install pyarrow)") from exc
    size = os.path.getsize(path)
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            names, total = pf.schema_arrow.names, pf.metadata.num_rows
            batches = pf.iter_batches(batch_size=rows_per_block, columns=[k for k in keys if k in names])
        else:
            source = pa.memory_map(path)
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                reader = reader.read_all().to_reader()
            names, total = reader.schema.names, None
            batches = reader
    except (OSError, pa.ArrowException) as exc:
        raise PreprocessError(f"{path}: cannot read as {fmt}: {exc}") from exc
    missing = [k for k in keys if k not in names]
    if missing:
        raise PreprocessError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
    row = 1
    for batch in batches:
        if batch.num_rows == 0:
            continue
        cols = {k: batch.column(k).to_pylist() for k in keys}
        done = row - 1 + batch.num_rows
        frac = done / total if total else 0.0
        yield Block("rows", path, row, cols, base + int(size * frac))
        row = done + 1


def iter_blocks(files, keys: list[str], block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The work of a run, in input order; `files` are (path, format) pairs or `Piece`s."""
    pieces = [f if isinstance(f, Piece) else Piece(*f) for f in files]
    base = 0
    text_run: list[tuple[str, int]] = []
    for piece in pieces + [Piece("", "end")]:
        path, fmt = piece.path, piece.fmt
        if fmt != "text" and text_run:
            yield from _iter_text_files([p for p, _ in text_run], [b for _, b in text_run], block_bytes)
            text_run = []
        if fmt == "end":
            break
        size = piece.size()
        if fmt == "text":
            if keys != ["text"]:
                raise PreprocessError(f"{path}: plain-text input has one field; use --json-keys text")
            text_run.append((path, base))
        elif fmt == "jsonl":
            yield from _iter_jsonl(piece, base, block_bytes)
        else:
            yield from _iter_table(path, fmt, keys, base, ROWS_PER_BLOCK)
        base += size
