"""The tokenizing engine of `preprocess`: blocks of input -> flat arrays of ids, in worker processes.

`tokenize_pieces` reads the input (`inputs.iter_blocks`) in ~0.5 MiB blocks of whole lines and hands the
raw bytes to worker processes; each worker parses a block, tokenizes it all at once through the
library's batch path (HF tokenizers `encode_batch`, SentencePiece list `encode`) and sends back flat
numpy arrays already in the output dtype (`tokenize_block` -> `BlockResult`), in Megatron's layout (see
`preprocess`); the owning process only writes bytes, in input order. A bad record makes the block's
result an error `file:line: reason`, or with `skip_invalid` is counted and dropped.

Both `preprocess` (the whole input in one process) and `partitions` (one process per part of the
input) run the engine; what they share of process handling is here too (`mp_context`,
`raise_interrupt`).
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import signal
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_dataeff.data.indexed import IndexedDatasetWriter
from megatron_dataeff.data.inputs import Block, Piece, PreprocessError, iter_blocks, lines_before
from megatron_dataeff.data.sentences import make_sentence_splitter, split_sentences
from megatron_dataeff.data.tokenizers import Tokenizer, build_tokenizer


@dataclass
class KeyOutput:
    """One key's ids over the documents of a block."""

    ids: np.ndarray  # [n_tokens] output dtype
    seq_lengths: np.ndarray  # [n_seqs] int64
    seqs_per_doc: np.ndarray  # [n_docs] int64


@dataclass
class BlockResult:
    """What a worker made of a block: the ids of each key, or the error that stops the run."""

    outputs: dict  # key -> KeyOutput
    documents: int
    invalid: int = 0
    blank: int = 0
    error: Optional[str] = None
    progress: int = 0
    first_invalid: Optional[str] = None


@dataclass
class WorkerSpec:
    """What a worker needs to tokenize blocks: it is sent to each worker process."""

    build_args: dict
    keys: list
    append_eod: bool
    skip_invalid: bool
    dtype: str
    threads: int = 1
    splitter: Optional[dict] = None  # make_sentence_splitter's arguments, with --split-sentences


# --------------------------------------------------------------------------------------------------
# Workers: records -> flat ids
# --------------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(spec: WorkerSpec, tok: Optional[Tokenizer] = None) -> None:
    if tok is None:  # one library thread each: the pool (or the partitions) give the parallelism
        tok = build_tokenizer(**spec.build_args)
        tok.set_num_threads(spec.threads)
    split = make_sentence_splitter(**spec.splitter) if spec.splitter is not None else None
    _STATE.update(spec=spec, tok=tok, eod=tok.eod if spec.append_eod else None, vocab=tok.vocab_size, split=split)


def _records(block: Block, keys: list, first: int) -> Iterator[tuple[str, object]]:
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

    Returns (KeyOutput, None), or (None, (document index, message)) for a document that fails."""
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
    return KeyOutput(flat.astype(dtype), seq_lengths, seqs_per_doc), None


def tokenize_block(block: Block) -> BlockResult:
    """A block's ids, in the worker set up by `_init_worker`."""
    result = _process_records(block, block.first)
    if block.line_origin and (result.error is not None or result.first_invalid is not None):
        # A partition's block counts lines from where the partition starts: redo it with the file's
        # own line numbers, counted only now that a message needs them.
        result = _process_records(block, lines_before(block.path, block.line_origin) + block.first)
    return result


def _process_records(block: Block, first: int) -> BlockResult:
    spec: WorkerSpec = _STATE["spec"]
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
                return BlockResult({}, 0, error=str(err), progress=block.progress)
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
            return BlockResult({}, 0, error=err, progress=block.progress)
        # Drop the record from every key and start the block's keys again.
        invalid += 1
        first_invalid = first_invalid or err
        for kk in keys:
            del columns[kk][doc]
        del wheres[doc]
        outputs.clear()
    return BlockResult(outputs, len(wheres), invalid, blank, progress=block.progress, first_invalid=first_invalid)


# --------------------------------------------------------------------------------------------------
# The owner: blocks -> workers -> writers, in order
# --------------------------------------------------------------------------------------------------
def mp_context():
    """The multiprocessing context of the engine's processes: fork where there is one."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def raise_interrupt(signum, frame):
    """A SIGTERM handler: a plain `kill` unwinds like Ctrl-C, so temporary files are removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def _init_pool_worker(spec: WorkerSpec) -> None:
    # Ctrl-C and `kill` are for the process owning the pool: it stops and terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # blocked since the fork (_start_pool): a pending one kills us now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _init_worker(spec)


def _start_pool(workers: int, spec: WorkerSpec):
    """A pool of `workers` processes that cannot lose pool.terminate()'s SIGTERM.

    A forked worker inherits the owner's SIGTERM handler (`raise_interrupt`) until its initializer
    resets it; a SIGTERM arriving in between would be caught by the C handler and then dropped by
    Python, whose handler is no longer callable, and the worker would block forever on the task
    queue's lock while terminate() joins it.  So SIGTERM is blocked across the fork, and each worker
    unblocks it only once its handler is the default.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return mp_context().Pool(workers, initializer=_init_pool_worker, initargs=(spec,))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return mp_context().Pool(workers, initializer=_init_pool_worker, initargs=(spec,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def tokenize_pieces(pieces: list[Piece], writers: list[IndexedDatasetWriter], spec: WorkerSpec, workers: int,
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

        def consume(result: BlockResult) -> None:
            if result.error is not None:
                raise PreprocessError(result.error)
            for w, k in zip(writers, spec.keys):
                out = result.outputs[k]
                w.add_documents(out.ids, out.seq_lengths, out.seqs_per_doc)
            on_result(result)

        for block in iter_blocks(pieces, spec.keys, block_bytes):
            if pool is None:
                consume(tokenize_block(block))
                continue
            pending.append(pool.apply_async(tokenize_block, (block,)))
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
