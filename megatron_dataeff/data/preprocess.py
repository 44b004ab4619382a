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

The steps have modules of their own: `inputs` finds the input files and reads them into blocks of work,
`sentences` splits texts into sentences, `partitions` cuts the input into parts, runs one process per
part and merges their outputs. This module is the engine: the workers that turn a block into ids
(`_process_block`) and the run that writes them (`preprocess`). The names the tools use
(`PreprocessError`, `INPUT_FORMATS`, `SENTENCE_SPLITTERS`, `open_text`, `resolve_inputs`,
`partition_inputs`) can all be imported from here.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_dataeff.data.indexed import IndexedDatasetWriter, optimal_dtype, publish_all
# INPUT_FORMATS, open_text and SENTENCE_SPLITTERS are not used here: they are re-exported (see above).
from megatron_dataeff.data.inputs import (  # noqa: F401
    BLOCK_BYTES, INPUT_FORMATS, PreprocessError, _Block, _lines_before, _Piece, iter_blocks, open_text,
    resolve_inputs)
from megatron_dataeff.data.partitions import partition_inputs, run_partitions
from megatron_dataeff.data.sentences import SENTENCE_SPLITTERS, make_sentence_splitter, split_sentences  # noqa: F401
from megatron_dataeff.data.tokenizers import Tokenizer, build_tokenizer


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
    if hasattr(signal, "pthread_sigmask"):  # blocked since the fork (_start_pool): a pending one kills us now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _init_worker(spec)


def _start_pool(workers: int, spec: _WorkerSpec):
    """A pool of `workers` processes that cannot lose pool.terminate()'s SIGTERM.

    A forked worker inherits the owner's SIGTERM handler (`_raise_interrupt`) until its initializer
    resets it; a SIGTERM arriving in between would be caught by the C handler and then dropped by
    Python, whose handler is no longer callable, and the worker would block forever on the task
    queue's lock while terminate() joins it.  So SIGTERM is blocked across the fork, and each worker
    unblocks it only once its handler is the default.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return _mp_context().Pool(workers, initializer=_init_pool_worker, initargs=(spec,))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return _mp_context().Pool(workers, initializer=_init_pool_worker, initargs=(spec,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
            run_partitions(parts, spec, workers, block_bytes, summary, progress, log)
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
            pool = _start_pool(workers, spec)
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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
