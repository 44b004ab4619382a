"""Text -> Megatron indexed dataset, as Megatron-LM's `tools/preprocess_data.py` does it, but faster.

Same output for the same flags: for each JSON key, `{output_prefix}_{key}_document.bin/.idx`, one
document per input record, its ids as the tokenizer's `tokenize` gives them (no BOS/EOS), EOD appended
with `append_eod` to documents that have tokens, a document with no tokens recorded with no sequences,
a key holding a list of strings stored as one sequence per non-empty string, and token dtype uint16
below 65500 ids else int32.

`split_sentences` (Megatron-LM's `--split-sentences`) splits each text into sentences with NLTK's punkt
model and stores one sequence per sentence, in `{output_prefix}_{key}_sentence.bin/.idx` (a key holding
a list of strings has each string split); `keep_newlines` keeps the whitespace after each sentence,
newlines included, as Megatron-LM's `CustomLanguageVars` does. `partitions` splits the input into that
many contiguous parts, each tokenized by its own process (with its share of the workers) into a
temporary partial dataset; the parts are then merged in order, so the output is the same bytes as with
one partition.

How it is faster: the main process reads the input in ~0.5 MiB blocks of whole lines and hands the raw
bytes to worker processes, which parse, tokenize a whole block at once through the library's batch
path (HF tokenizers `encode_batch`, SentencePiece list `encode`) and send back flat numpy arrays
already in the output dtype; the main process only writes bytes.

Bad input (invalid JSON or UTF-8, a missing key, a value that is not text) stops the run with
`PreprocessError("file:line: ...")` and leaves no output; `skip_invalid` counts and skips such records.
Output is written under temporary names and published only when complete (`indexed.publish_all`).
"""

from __future__ import annotations

import bisect
import collections
import functools
import glob
import gzip
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megatron_dataeff.data.indexed import IndexedDatasetWriter, optimal_dtype, publish_all
from megatron_dataeff.data.tokenizers import Tokenizer, build_tokenizer

INPUT_FORMATS = ("jsonl", "text", "parquet", "arrow")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text",
               ".md": "text", ".parquet": "parquet", ".arrow": "arrow"}
BLOCK_BYTES = 512 * 1024
ROWS_PER_BLOCK = 2048


class PreprocessError(RuntimeError):
    """Bad input or arguments; the message names the file (and line) at fault."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
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
class _Block:
    """One unit of work: raw JSONL lines, whole text files, or rows of a table."""

    kind: str  # "jsonl" | "text" | "rows"
    path: str
    first: int  # line (jsonl) or row (rows) number of the first record, 1-based
    data: object  # bytes | list[bytes] | dict[key, list]
    progress: int = 0  # input bytes consumed once this block is done (over all files)
    line_origin: int = 0  # > 0: `first` counts lines from this byte offset of the file, not from its start


@dataclass
class _Piece:
    """A file, or for uncompressed JSONL a byte range of whole lines of it."""

    path: str
    fmt: str
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file

    def size(self) -> int:
        end = os.path.getsize(self.path) if self.end is None else self.end
        return end - self.start


def _line_start_at_or_after(path: str, offset: int) -> int:
    """The first offset >= `offset` at which a line of `path` starts (the file size if none does)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        pos = offset - 1
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                return pos
            cut = chunk.find(b"\n")
            if cut >= 0:
                return pos + cut + 1
            pos += len(chunk)


def partition_inputs(files: list[tuple[str, str]], partitions: int) -> list[list[_Piece]]:
    """`files` cut into at most `partitions` contiguous runs of about equal size, in input order.

    Uncompressed JSONL files are cut between lines wherever a partition boundary falls inside them;
    other files (gzip, text, Parquet, Arrow) go whole to the partition holding their middle byte.
    Partitions left with nothing are dropped."""
    sizes = [os.path.getsize(p) for p, _ in files]
    total = sum(sizes)
    bounds = [total * i // partitions for i in range(1, partitions)]
    parts: list[list[_Piece]] = [[] for _ in range(partitions)]
    base = 0
    for (path, fmt), size in zip(files, sizes):
        if fmt == "jsonl" and not path.endswith(".gz") and size > 0:
            inner = [b for b in bounds if base < b < base + size]
            starts = [0] + [_line_start_at_or_after(path, b - base) for b in inner]
            ends = starts[1:] + [size]
            for raw, start, end in zip([base] + inner, starts, ends):
                if end > start:
                    parts[bisect.bisect_right(bounds, raw)].append(_Piece(path, fmt, start, end))
        else:
            parts[bisect.bisect_right(bounds, base + size // 2)].append(_Piece(path, fmt))
        base += size
    return [p for p in parts if p]


@functools.lru_cache(maxsize=64)
def _lines_before(path: str, offset: int) -> int:
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


def _iter_jsonl(piece: _Piece, base: int, block_bytes: int) -> Iterator[_Block]:
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
            yield _Block("jsonl", path, line, blob, base + raw.tell() - start, start)
            line += blob.count(b"\n")
        if rest:
            yield _Block("jsonl", path, line, rest, base + raw.tell() - start, start)
    finally:
        raw.close()


def _iter_text_files(paths: list[str], bases: list[int], block_bytes: int) -> Iterator[_Block]:
    batch, size = [], 0
    for path, base in zip(paths, bases):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
        batch.append((path, data))
        size += len(data)
        if size >= block_bytes:
            yield _Block("text", path, 1, batch, base + os.path.getsize(path))
            batch, size = [], 0
    if batch:
        yield _Block("text", batch[-1][0], 1, batch, bases[-1] + os.path.getsize(batch[-1][0]))


def _iter_table(path: str, fmt: str, keys: list[str], base: int, rows_per_block: int) -> Iterator[_Block]:
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
        yield _Block("rows", path, row, cols, base + int(size * frac))
        row = done + 1


def iter_blocks(files, keys: list[str], block_bytes: int = BLOCK_BYTES) -> Iterator[_Block]:
    """The work of a run, in input order; `files` are (path, format) pairs or `_Piece`s."""
    pieces = [f if isinstance(f, _Piece) else _Piece(*f) for f in files]
    base = 0
    text_run: list[tuple[str, int]] = []
    for piece in pieces + [_Piece("", "end")]:
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


# --------------------------------------------------------------------------------------------------
# Sentence splitting (--split-sentences)
# --------------------------------------------------------------------------------------------------
SENTENCE_SPLITTERS = ("punkt", "punkt-untrained")
_SPLIT_CHARS = 1_000_000  # Megatron-LM hands a text to the splitter in pieces of this many characters

# Megatron-LM's CustomLanguageVars (tools/preprocess_data.py, from
# https://stackoverflow.com/questions/33139531): `\s*` instead of `\s+` keeps the whitespace after a
# sentence end, newlines included, at the end of that sentence instead of dropping it.
_KEEP_NEWLINES_PERIOD_CONTEXT = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""


@functools.lru_cache(maxsize=1)
def _keep_newlines_vars_class():
    from nltk.tokenize.punkt import PunktLanguageVars

    return type("CustomLanguageVars", (PunktLanguageVars,), {"_period_context_fmt": _KEEP_NEWLINES_PERIOD_CONTEXT})


def _punkt_model(lang: str):
    """NLTK's trained punkt tokenizer for `lang`: the `punkt_tab` data (NLTK >= 3.8.2, which also
    serves Megatron-LM's `nltk.load("tokenizers/punkt/{lang}.pickle")`), else the old pickle."""
    import nltk

    try:
        from nltk.tokenize.punkt import PunktTokenizer
    except ImportError:  # NLTK < 3.8.2 has only the pickled models
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    try:
        return PunktTokenizer(lang)
    except LookupError:
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")  # NLTK 3.8.2-3.8.x still reads the pickle


def make_sentence_splitter(kind: str = "punkt", lang: str = "english", keep_newlines: bool = False):
    """An object whose `tokenize(text)` gives the sentences of `text`, as Megatron-LM builds it.

    kind "punkt": NLTK's trained punkt model for `lang` (what Megatron-LM uses; needs `pip install nltk`
    and its data, `python -m nltk.downloader punkt_tab`). kind "punkt-untrained": punkt with no model
    (no abbreviations or collocations known, so e.g. "Dr. Smith" is split after "Dr."): needs only the
    nltk package, and its output is NOT the same as Megatron-LM's."""
    if kind not in SENTENCE_SPLITTERS:
        raise PreprocessError(f"sentence splitter must be one of {SENTENCE_SPLITTERS}, got {kind!r}")
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as exc:
        raise PreprocessError("--split-sentences needs NLTK: pip install nltk"
                              + (" (and its punkt data: python -m nltk.downloader punkt_tab)"
                                 if kind == "punkt" else "")) from exc
    if kind == "punkt":
        try:
            model = _punkt_model(lang)
        except (LookupError, OSError, ValueError) as exc:
            import nltk

            raise PreprocessError(
                f"--split-sentences: NLTK's punkt model for {lang!r} is not installed (searched "
                f"{os.pathsep.join(map(str, nltk.data.path))}). Install it with: python -m nltk.downloader "
                f"punkt_tab (or put tokenizers/punkt_tab/{lang}/ under a folder named by NLTK_DATA); or pass "
                f"--sentence-splitter punkt-untrained to split with no model (output not identical to "
                f"Megatron-LM's)") from exc
        params = model._params
    else:
        model, params = PunktSentenceTokenizer(), PunktParameters()
    if not keep_newlines:
        return model
    return PunktSentenceTokenizer(train_text=params, lang_vars=_keep_newlines_vars_class()())


def split_sentences(splitter, text) -> list[str]:
    """The sentences of `text` (a string, or a list of strings split one by one), in Megatron-LM's way:
    the text goes to the splitter in pieces of 1,000,000 characters."""
    texts = [text] if isinstance(text, str) else text
    return [sent for t in texts for i in range(0, len(t), _SPLIT_CHARS)
            for sent in splitter.tokenize(t[i:i + _SPLIT_CHARS])]


# --------------------------------------------------------------------------------------------------
# Workers: records -> flat ids
# --------------------------------------------------------------------------------------------------
@dataclass
class _KeyOutput:
    ids: np.ndarray  # [n_tokens] output dtype
    seq_lengths: np.ndarray  # [n_seqs] int64
    seqs_per_doc: np.ndarray  # [n_docs] int64


@dataclass
class _BlockResult:
    outputs: dict  # key -> _KeyOutput
    documents: int
    invalid: int = 0
    blank: int = 0
    error: Optional[str] = None
    progress: int = 0
    first_invalid: Optional[str] = None


@dataclass
class _WorkerSpec:
    build_args: dict
    keys: list
    append_eod: bool
    skip_invalid: bool
    dtype: str
    threads: int = 1
    splitter: Optional[dict] = None  # make_sentence_splitter's arguments, with --split-sentences


_STATE: dict = {}


def _init_pool_worker(spec: _WorkerSpec) -> None:
    # Ctrl-C and `kill` are for the process owning the pool: it stops and terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(spec)


def _init_worker(spec: _WorkerSpec, tok: Optional[Tokenizer] = None) -> None:
    if tok is None:  # one library thread each: the pool (or the partitions) give the parallelism
        tok = build_tokenizer(**spec.build_args)
        tok.set_num_threads(spec.threads)
    split = make_sentence_splitter(**spec.splitter) if spec.splitter is not None else None
    _STATE.update(spec=spec, tok=tok, eod=tok.eod if spec.append_eod else None, vocab=tok.vocab_size, split=split)


def _records(block: _Block, keys: list, first: int) -> Iterator[tuple[str, object]]:
    """(location, record or exception) of each record of a block; records are dicts key -> value.
    `first`: the line number of the block's first line."""
    if block.kind == "jsonl":
        lines = block.data.split(b"\n")
        if lines and not lines[-1]:  # the newline ending the block's last line
            lines.pop()
        for i, raw in enumerate(lines):
            where = f"{block.path}:{first + i}"
            if not raw.strip():
                yield where, None  # a blank line
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, PreprocessError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                                             f"column {exc.start + 1})")
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                yield where, PreprocessError(f"{where}: not valid JSON ({exc})")
                continue
            if not isinstance(rec, dict):
                yield where, PreprocessError(f"{where}: a JSON {type(rec).__name__}, not an object")
                continue
            yield where, rec
    elif block.kind == "text":
        for path, data in block.data:
            try:
                yield path, {"text": data.decode("utf-8")}
            except UnicodeDecodeError as exc:
                line = data[:exc.start].count(b"\n") + 1
                yield f"{path}:{line}", PreprocessError(f"{path}:{line}: not valid UTF-8 (byte "
                                                        f"0x{data[exc.start]:02x})")
    else:
        cols = block.data
        n = len(next(iter(cols.values())))
        for i in range(n):
            yield f"{block.path}:row {block.first + i}", {k: cols[k][i] for k in keys}


def _check_value(where: str, key: str, rec: dict):
    if key not in rec:
        return PreprocessError(f"{where}: no key {key!r}")
    value = rec[key]
    if isinstance(value, str):
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    return PreprocessError(f"{where}: {key!r} is {type(value).__name__}, not a string or list of strings")


def _tokenize(tok: Tokenizer, texts: list[str]):
    """Batch tokenize -> (flat, lengths, None); on failure (None, None, (index of the text, error))."""
    try:
        flat, lengths = tok.tokenize_batch_flat(texts)
        return flat, lengths, None
    except Exception:  # locate the text; the batch call does not say which one failed
        for i, text in enumerate(texts):
            try:
                tok.tokenize(text)
            except Exception as exc:  # noqa: BLE001 - reported with its location
                return None, None, (i, f"cannot tokenize: {exc!r}")
        raise


def _encode_key(tok, texts: list, eod: Optional[int], vocab: int, dtype):
    """Ids of one key over the documents of a block, in Megatron's layout.

    Returns (_KeyOutput, None), or (None, (document index, message)) for a document that fails."""
    if all(isinstance(t, str) for t in texts):
        sents, doc_of_sent, per_doc = texts, None, None
    else:
        sents, counts = [], []
        for t in texts:
            parts = [t] if isinstance(t, str) else t
            sents += parts
            counts.append(len(parts))
        per_doc = np.asarray(counts, dtype=np.int64)
        doc_of_sent = np.repeat(np.arange(len(texts)), per_doc)
    flat, lengths, fail = _tokenize(tok, sents)
    if fail is not None:
        i, msg = fail
        return None, (i if doc_of_sent is None else int(doc_of_sent[i]), msg)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
        bad = int(np.argmax((flat < 0) | (flat >= vocab)))
        sent = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        return None, (sent if doc_of_sent is None else int(doc_of_sent[sent]),
                      f"token id {int(flat[bad])} outside the vocabulary [0, {vocab})")
    keep = lengths > 0
    seq_lengths = lengths[keep]
    if per_doc is None:
        seqs_per_doc = keep.astype(np.int64)
    else:
        seqs_per_doc = np.bincount(doc_of_sent[keep], minlength=len(texts)).astype(np.int64)
    if eod is not None and seq_lengths.size:
        last = np.cumsum(seqs_per_doc)[seqs_per_doc > 0] - 1  # last sequence of each non-empty document
        ends = np.cumsum(seq_lengths)[last]
        flat = np.insert(flat, ends, eod)
        seq_lengths = seq_lengths.copy()
        seq_lengths[last] += 1
    return _KeyOutput(flat.astype(dtype), seq_lengths, seqs_per_doc), None


def _process_block(block: _Block) -> _BlockResult:
    result = _process_records(block, block.first)
    if block.line_origin and (result.error is not None or result.first_invalid is not None):
        # A partition's block counts lines from where the partition starts: redo it with the file's
        # own line numbers, counted only now that a message needs them.
        result = _process_records(block, _lines_before(block.path, block.line_origin) + block.first)
    return result


def _process_records(block: _Block, first: int) -> _BlockResult:
    spec: _WorkerSpec = _STATE["spec"]
    tok, eod, vocab, keys, split = _STATE["tok"], _STATE["eod"], _STATE["vocab"], spec.keys, _STATE["split"]
    columns = {k: [] for k in keys}
    wheres: list[str] = []
    invalid = blank = 0
    first_invalid = None
    for where, rec in _records(block, keys, first):
        if rec is None:
            blank += 1
            continue
        err = rec if isinstance(rec, Exception) else next(
            (e for e in (_check_value(where, k, rec) for k in keys) if e is not None), None)
        values = None
        if err is None:
            values = [rec[k] for k in keys]
            if split is not None:
                try:
                    values = [split_sentences(split, v) for v in values]
                except Exception as exc:  # noqa: BLE001 - reported with its location
                    err = PreprocessError(f"{where}: cannot split into sentences: {exc!r}")
        if err is not None:
            if not spec.skip_invalid:
                return _BlockResult({}, 0, error=str(err), progress=block.progress)
            invalid += 1
            first_invalid = first_invalid or str(err)
            continue
        for k, v in zip(keys, values):
            columns[k].append(v)
        wheres.append(where)
    outputs: dict = {}
    while len(outputs) < len(keys):
        k = keys[len(outputs)]
        out, fail = _encode_key(tok, columns[k], eod, vocab, np.dtype(spec.dtype))
        if fail is None:
            outputs[k] = out
            continue
        doc, msg = fail
        err = f"{wheres[doc]}: {msg}"
        if not spec.skip_invalid:
            return _BlockResult({}, 0, error=err, progress=block.progress)
        # Drop the record from every key and start the block's keys again.
        invalid += 1
        first_invalid = first_invalid or err
        for kk in keys:
            del columns[kk][doc]
        del wheres[doc]
        outputs.clear()
    return _BlockResult(outputs, len(wheres), invalid, blank, progress=block.progress, first_invalid=first_invalid)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
_COUNTS = ("documents", "sequences", "tokens", "empty_documents", "invalid_skipped", "blank_lines")


@dataclass
class PreprocessSummary:
    """What a run wrote."""

    outputs: dict  # key -> dataset prefix
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    empty_documents: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    invalid_skipped: int = 0
    blank_lines: int = 0
    files: int = 0
    dtype: str = ""
    partitions: int = 1

    def describe(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        parts = f", {self.partitions} partitions" if self.partitions > 1 else ""
        lines = [f"documents: {self.documents:,} ({self.empty_documents:,} without tokens)",
                 f"tokens:    {self.tokens:,} ({self.dtype}), {self.sequences:,} sequences",
                 f"input:     {self.files} file(s), {self.input_bytes / 1e6:,.1f} MB{parts}",
                 f"time:      {self.seconds:,.1f} s ({rate:,.0f} tokens/s)"]
        if self.invalid_skipped:
            lines.append(f"skipped:   {self.invalid_skipped:,} invalid record(s)")
        if self.blank_lines:
            lines.append(f"blank:     {self.blank_lines:,} blank line(s) ignored")
        lines += [f"output:    {p}.bin/.idx" for p in self.outputs.values()]
        return "\n".join(lines)

    def _add(self, result: _BlockResult, key: str) -> None:
        """Count a written block (`key`: the key whose sequences and tokens are counted)."""
        out = result.outputs[key]
        self._add_counts((result.documents, int(out.seq_lengths.size), int(out.ids.size),
                          int(np.count_nonzero(out.seqs_per_doc == 0)), result.invalid, result.blank))

    def _counts(self) -> tuple:
        return tuple(getattr(self, name) for name in _COUNTS)

    def _add_counts(self, counts) -> None:
        for name, n in zip(_COUNTS, counts):
            setattr(self, name, getattr(self, name) + n)


class _Progress:
    def __init__(self, total_bytes: int, log_interval: int, stream):
        self.total, self.interval, self.stream = max(total_bytes, 1), max(log_interval, 1), stream
        self.start = self.last_log = time.time()
        self.logged_docs = 0

    def update(self, docs: int, tokens: int, done_bytes: int, force: bool = False) -> None:
        now = time.time()
        if docs == self.logged_docs and force:
            return
        if not force and docs // self.interval == self.logged_docs // self.interval:
            return
        self.logged_docs = docs
        elapsed = max(now - self.start, 1e-9)
        frac = min(done_bytes / self.total, 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        print(f"processed {docs:,} documents, {tokens:,} tokens ({docs / elapsed:,.0f} docs/s, "
              f"{done_bytes / elapsed / 1e6:,.2f} MB/s), {100 * frac:.1f}% of input, ETA {eta_s}",
              file=self.stream, flush=True)


def preprocess(inputs, output_prefix: str, tokenizer: Optional[Tokenizer] = None, *, tokenizer_args: Optional[dict]
               = None, json_keys=("text",), append_eod: bool = False, workers: int = 1, log_interval: int = 1000,
               input_format: Optional[str] = None, skip_invalid: bool = False, block_bytes: int = BLOCK_BYTES,
               log_stream=None, split_sentences: bool = False, keep_newlines: bool = False,
               sentence_splitter: str = "punkt", lang: str = "english", partitions: int = 1) -> PreprocessSummary:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx` for each of `json_keys`.

    `split_sentences`: one sequence per sentence (`make_sentence_splitter(sentence_splitter, lang,
    keep_newlines)`), written to `{output_prefix}_{key}_sentence.bin/.idx`. `partitions` > 1: that many
    processes, each with its share of `workers`, tokenize contiguous parts of the input; the output is
    the same bytes as with one."""
    log = log_stream if log_stream is not None else sys.stderr
    if tokenizer is None:
        if tokenizer_args is None:
            raise ValueError("give a tokenizer or tokenizer_args")
        tokenizer = build_tokenizer(**tokenizer_args)
    keys = list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must be distinct names, got {keys}")
    if workers < 1 or partitions < 1:
        raise PreprocessError(f"--workers and --partitions must be >= 1, got {workers} and {partitions}")
    if append_eod:
        try:
            tokenizer.eod
        except ValueError as exc:
            raise PreprocessError(f"--append-eod: {exc}") from exc
    splitter = None
    if split_sentences:
        splitter = dict(kind=sentence_splitter, lang=lang, keep_newlines=keep_newlines)
        make_sentence_splitter(**splitter)  # fails here, saying what to install, rather than in every worker
    files = resolve_inputs(inputs, input_format)
    total_bytes = sum(os.path.getsize(p) for p, _ in files)
    dtype = optimal_dtype(tokenizer.vocab_size)
    spec = _WorkerSpec(tokenizer.build_args(), keys, append_eod, skip_invalid, np.dtype(dtype).str, splitter=splitter)
    parts = partition_inputs(files, partitions) if partitions > 1 else [[_Piece(p, fmt) for p, fmt in files]]
    level = "sentence" if split_sentences else "document"
    summary = PreprocessSummary({k: f"{output_prefix}_{k}_{level}" for k in keys}, files=len(files),
                                input_bytes=total_bytes, dtype=np.dtype(dtype).name, partitions=len(parts))
    progress = _Progress(total_bytes, log_interval, log)
    start = time.time()
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # A plain `kill` unwinds like Ctrl-C, so temporary files are removed.
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if len(parts) > 1:
            _run_partitions(parts, spec, workers, block_bytes, summary, progress, log)
        else:
            _run_one(parts[0], spec, workers, block_bytes, tokenizer, summary, progress, log)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    summary.seconds = time.time() - start
    progress.update(summary.documents, summary.tokens, total_bytes, force=True)
    return summary


def _mp_context():
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def _run_pieces(pieces: list[_Piece], writers: list[IndexedDatasetWriter], spec: _WorkerSpec, workers: int,
                block_bytes: int, tokenizer: Optional[Tokenizer], on_result) -> None:
    """Tokenize `pieces` in order into `writers` (one per key) with `workers` processes (1: in this one,
    with `tokenizer` or one built from `spec`); `on_result(result)` after each block is written."""
    pool = None
    try:
        if workers > 1:
            pool = _mp_context().Pool(workers, initializer=_init_pool_worker, initargs=(spec,))
        else:
            _init_worker(spec, tokenizer)
        pending: collections.deque = collections.deque()

        def consume(result: _BlockResult) -> None:
            if result.error is not None:
                raise PreprocessError(result.error)
            for w, k in zip(writers, spec.keys):
                out = result.outputs[k]
                w.add_documents(out.ids, out.seq_lengths, out.seqs_per_doc)
            on_result(result)

        for block in iter_blocks(pieces, spec.keys, block_bytes):
            if pool is None:
                consume(_process_block(block))
                continue
            pending.append(pool.apply_async(_process_block, (block,)))
            while len(pending) >= 2 * workers + 2:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _check_documents(summary: PreprocessSummary, pieces) -> None:
    if summary.documents == 0:
        what = "valid documents" if summary.invalid_skipped else "documents"
        names = dict.fromkeys(p.path for part in pieces for p in part)
        raise PreprocessError(f"no {what} in input {', '.join(names)}")


def _run_one(pieces, spec, workers, block_bytes, tokenizer, summary, progress, log) -> None:
    """The whole input in this process (and its pool), straight into the output."""
    writers = [IndexedDatasetWriter(summary.outputs[k], dtype=spec.dtype) for k in spec.keys]

    def on_result(result: _BlockResult) -> None:
        summary._add(result, spec.keys[0])
        if result.first_invalid and summary.invalid_skipped == result.invalid:
            print(f"skipping invalid record: {result.first_invalid}", file=log, flush=True)
        progress.update(summary.documents, summary.tokens, result.progress)

    try:
        _run_pieces(pieces, writers, spec, workers, block_bytes, tokenizer, on_result)
        _check_documents(summary, [pieces])
        publish_all(writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _partition_main(index: int, spec: _WorkerSpec, pieces: list[_Piece], prefixes: dict, workers: int,
                    block_bytes: int, conn) -> None:
    """One partition's process: `pieces` -> complete datasets at `prefixes` (key -> prefix), reporting
    ("progress", counts, bytes done, first invalid record), then ("done", counts) or ("error", message)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    counts = PreprocessSummary(dict(prefixes))
    writers: list[IndexedDatasetWriter] = []
    try:
        writers = [IndexedDatasetWriter(prefixes[k], dtype=spec.dtype) for k in spec.keys]

        def on_result(result: _BlockResult) -> None:
            counts._add(result, spec.keys[0])
            conn.send(("progress", counts._counts(), result.progress, result.first_invalid))

        _run_pieces(pieces, writers, spec, workers, block_bytes, None, on_result)
        publish_all(writers)
        conn.send(("done", counts._counts()))
    except KeyboardInterrupt:  # stopped by the main process (or Ctrl-C): it reports
        for w in writers:
            w.abort()
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001 - handed to the main process
        for w in writers:
            w.abort()
        message = str(exc) if isinstance(exc, PreprocessError) else f"{type(exc).__name__}: {exc}"
        try:
            conn.send(("error", message))
        except OSError:
            pass
        sys.exit(1)
    finally:
        conn.close()


def _receive(conn) -> list:
    """The messages waiting on `conn`."""
    messages = []
    try:
        while conn.poll():
            messages.append(conn.recv())
    except (EOFError, OSError):
        pass
    return messages


def _stop(procs) -> None:
    """Stop the partition processes still running (SIGTERM: they remove their files), then reap all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    for p in procs:
        p.join(timeout=30)
        if p.exitcode is None:
            p.kill()
            p.join()


def _run_partitions(parts: list[list[_Piece]], spec, workers, block_bytes, summary, progress, log) -> None:
    """Each part in its own process into a partial dataset (in a temporary folder next to the output),
    then the partials appended in order into the output; the folder is removed whatever happens."""
    n = len(parts)
    shares = [max(1, workers // n + (i < workers % n)) for i in range(n)]
    first = summary.outputs[spec.keys[0]]
    directory = os.path.dirname(os.path.abspath(first))
    os.makedirs(directory, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(first)}.partitions-", dir=directory)
    partial = [{k: os.path.join(tmpdir, f"part{i:04d}_{k}") for k in spec.keys} for i in range(n)]
    ctx = _mp_context()
    procs: list = []
    conns: list = []
    writers: list[IndexedDatasetWriter] = []
    latest = [((0,) * len(_COUNTS), 0) for _ in range(n)]
    finals: dict = {}
    errors: dict = {}
    shown_invalid = False
    try:
        for i in range(n):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_partition_main, name=f"preprocess-partition-{i}",
                               args=(i, spec, parts[i], partial[i], shares[i], block_bytes, send))
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        live = set(range(n))
        while live and not errors:
            multiprocessing.connection.wait([conns[i] for i in live] + [procs[i].sentinel for i in live])
            for i in sorted(live):
                messages = _receive(conns[i])
                if procs[i].exitcode is not None:  # all it sent is in the pipe by now
                    messages += _receive(conns[i])
                    live.discard(i)
                for msg in messages:
                    if msg[0] == "progress":
                        latest[i] = (msg[1], msg[2])
                        if msg[3] and not shown_invalid:
                            shown_invalid = True
                            print(f"skipping invalid record: {msg[3]}", file=log, flush=True)
                    elif msg[0] == "done":
                        finals[i] = msg[1]
                    else:
                        errors[i] = msg[1]
                if i not in live and i not in finals and i not in errors:
                    errors[i] = (f"partition {i} ({parts[i][0].path} ...) stopped with exit code "
                                 f"{procs[i].exitcode} before finishing")
            done = [sum(c[j] for c, _ in latest) for j in range(len(_COUNTS))]
            progress.update(done[0], done[2], sum(b for _, b in latest))
        if errors:
            raise PreprocessError(errors[min(errors)])
        for i in range(n):
            summary._add_counts(finals[i])
        _check_documents(summary, parts)
        print(f"merging {n} partitions", file=log, flush=True)
        writers = [IndexedDatasetWriter(summary.outputs[k], dtype=spec.dtype) for k in spec.keys]
        for w, k in zip(writers, spec.keys):
            for prefixes in partial:
                w.add_index(prefixes[k])
        publish_all(writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        _stop(procs)
        for c in conns:
            c.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
