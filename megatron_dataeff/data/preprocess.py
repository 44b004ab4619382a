"""Text -> Megatron indexed dataset, as Megatron-LM's `tools/preprocess_data.py` does it, but faster.

Same output for the same flags: for each JSON key, `{output_prefix}_{key}_document.bin/.idx`, one
document per input record, its ids as the tokenizer's `tokenize` gives them (no BOS/EOS), EOD appended
with `append_eod` to documents that have tokens, a document with no tokens recorded with no sequences,
a key holding a list of strings stored as one sequence per non-empty string, and token dtype uint16
below 65500 ids else int32.

How it is faster: the main process reads the input in ~0.5 MiB blocks of whole lines and hands the raw
bytes to worker processes, which parse, tokenize a whole block at once through the library's batch
path (HF tokenizers `encode_batch`, SentencePiece list `encode`) and send back flat numpy arrays
already in the output dtype; the main process only writes bytes.

Bad input (invalid JSON or UTF-8, a missing key, a value that is not text) stops the run with
`PreprocessError("file:line: ...")` and leaves no output; `skip_invalid` counts and skips such records.
Output is written under temporary names and published only when complete (`indexed.publish_all`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import multiprocessing
import os
import signal
import sys
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


def _iter_jsonl(path: str, base: int, block_bytes: int) -> Iterator[_Block]:
    raw = open(path, "rb")
    try:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        line, rest = 1, b""
        while True:
            try:
                data = stream.read(block_bytes)
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
            yield _Block("jsonl", path, line, blob, base + raw.tell())
            line += blob.count(b"\n")
        if rest:
            yield _Block("jsonl", path, line, rest, base + raw.tell())
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


def iter_blocks(files: list[tuple[str, str]], keys: list[str], block_bytes: int = BLOCK_BYTES) -> Iterator[_Block]:
    """The work of a run, in input order."""
    base = 0
    text_run: list[tuple[str, int]] = []
    for path, fmt in files + [("", "end")]:
        if fmt != "text" and text_run:
            yield from _iter_text_files([p for p, _ in text_run], [b for _, b in text_run], block_bytes)
            text_run = []
        if fmt == "end":
            break
        size = os.path.getsize(path)
        if fmt == "text":
            if keys != ["text"]:
                raise PreprocessError(f"{path}: plain-text input has one field; use --json-keys text")
            text_run.append((path, base))
        elif fmt == "jsonl":
            yield from _iter_jsonl(path, base, block_bytes)
        else:
            yield from _iter_table(path, fmt, keys, base, ROWS_PER_BLOCK)
        base += size


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


_STATE: dict = {}


def _init_worker(spec: _WorkerSpec, tok: Optional[Tokenizer] = None) -> None:
    # A pool worker ignores Ctrl-C; the main process decides and terminates the pool.
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if tok is None:  # a pool worker: one library thread each, the pool gives the parallelism
        tok = build_tokenizer(**spec.build_args)
        tok.set_num_threads(spec.threads)
    _STATE.update(spec=spec, tok=tok, eod=tok.eod if spec.append_eod else None, vocab=tok.vocab_size)


def _records(block: _Block, keys: list) -> Iterator[tuple[str, object]]:
    """(location, record or exception) of each record of a block; records are dicts key -> value."""
    if block.kind == "jsonl":
        lines = block.data.split(b"\n")
        if lines and not lines[-1]:  # the newline ending the block's last line
            lines.pop()
        for i, raw in enumerate(lines):
            where = f"{block.path}:{block.first + i}"
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
    spec: _WorkerSpec = _STATE["spec"]
    tok, eod, vocab, keys = _STATE["tok"], _STATE["eod"], _STATE["vocab"], spec.keys
    columns = {k: [] for k in keys}
    wheres: list[str] = []
    invalid = blank = 0
    first_invalid = None
    for where, rec in _records(block, keys):
        if rec is None:
            blank += 1
            continue
        err = rec if isinstance(rec, Exception) else next(
            (e for e in (_check_value(where, k, rec) for k in keys) if e is not None), None)
        if err is not None:
            if not spec.skip_invalid:
                return _BlockResult({}, 0, error=str(err), progress=block.progress)
            invalid += 1
            first_invalid = first_invalid or str(err)
            continue
        for k in keys:
            columns[k].append(rec[k])
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

    def describe(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [f"documents: {self.documents:,} ({self.empty_documents:,} without tokens)",
                 f"tokens:    {self.tokens:,} ({self.dtype}), {self.sequences:,} sequences",
                 f"input:     {self.files} file(s), {self.input_bytes / 1e6:,.1f} MB",
                 f"time:      {self.seconds:,.1f} s ({rate:,.0f} tokens/s)"]
        if self.invalid_skipped:
            lines.append(f"skipped:   {self.invalid_skipped:,} invalid record(s)")
        if self.blank_lines:
            lines.append(f"blank:     {self.blank_lines:,} blank line(s) ignored")
        lines += [f"output:    {p}.bin/.idx" for p in self.outputs.values()]
        return "\n".join(lines)


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
               log_stream=None) -> PreprocessSummary:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx` for each of `json_keys`."""
    log = log_stream if log_stream is not None else sys.stderr
    if tokenizer is None:
        if tokenizer_args is None:
            raise ValueError("give a tokenizer or tokenizer_args")
        tokenizer = build_tokenizer(**tokenizer_args)
    keys = list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must be distinct names, got {keys}")
    if append_eod:
        try:
            tokenizer.eod
        except ValueError as exc:
            raise PreprocessError(f"--append-eod: {exc}") from exc
    files = resolve_inputs(inputs, input_format)
    total_bytes = sum(os.path.getsize(p) for p, _ in files)
    dtype = optimal_dtype(tokenizer.vocab_size)
    spec = _WorkerSpec(tokenizer.build_args(), keys, append_eod, skip_invalid, np.dtype(dtype).str)
    summary = PreprocessSummary({k: f"{output_prefix}_{k}_document" for k in keys}, files=len(files),
                                input_bytes=total_bytes, dtype=np.dtype(dtype).name)
    progress = _Progress(total_bytes, log_interval, log)
    start = time.time()
    writers = [IndexedDatasetWriter(summary.outputs[k], vocab_size=tokenizer.vocab_size) for k in keys]
    pool = None
    old_term = None
    try:
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(spec,))
        else:
            _init_worker(spec, tokenizer)
        if threading.current_thread() is threading.main_thread():
            # A plain `kill` unwinds like Ctrl-C, so temporary files are removed.
            old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        pending: collections.deque = collections.deque()

        def consume(result: _BlockResult) -> None:
            if result.error is not None:
                raise PreprocessError(result.error)
            for w, k in zip(writers, keys):
                out = result.outputs[k]
                w.add_documents(out.ids, out.seq_lengths, out.seqs_per_doc)
            first = result.outputs[keys[0]]
            summary.documents += result.documents
            summary.sequences += int(first.seq_lengths.size)
            summary.tokens += int(first.ids.size)
            summary.empty_documents += int(np.count_nonzero(first.seqs_per_doc == 0))
            summary.invalid_skipped += result.invalid
            summary.blank_lines += result.blank
            if result.first_invalid and summary.invalid_skipped == result.invalid:
                print(f"skipping invalid record: {result.first_invalid}", file=log, flush=True)
            progress.update(summary.documents, summary.tokens, result.progress)

        for block in iter_blocks(files, keys, block_bytes):
            if pool is None:
                consume(_process_block(block))
                continue
            pending.append(pool.apply_async(_process_block, (block,)))
            while len(pending) >= 2 * workers + 2:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
        if summary.documents == 0:
            what = "valid documents" if summary.invalid_skipped else "documents"
            raise PreprocessError(f"no {what} in input {', '.join(p for p, _ in files)}")
        publish_all(writers)
    except BaseException:
        if pool is not None:
            pool.terminate()
        for w in writers:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    summary.seconds = time.time() - start
    progress.update(summary.documents, summary.tokens, total_bytes, force=True)
    return summary


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
