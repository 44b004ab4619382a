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
path and send back flat numpy arrays already in the output dtype; the main process only writes bytes
(`tokenize_blocks`).

Bad input (invalid JSON or UTF-8, a missing key, a value that is not text) stops the run with
`PreprocessError("file:line: ...")` and leaves no output; `skip_invalid` counts and skips such records.
Output is written under temporary names and published only when complete (`indexed.publish_all`).

The steps have modules of their own: `inputs` finds the input files and reads them into blocks of work,
`sentences` splits texts into sentences, `tokenize_blocks` is the engine (the workers that turn a block
into ids, and the loop that writes them in order), `partitions` cuts the input into parts, runs one
process per part and merges their outputs, and `preprocess_summary` counts what a run wrote. This
module is the run: it checks the arguments, picks the output dtype and runs the engine, in this
process or in partitions (`preprocess`). The names the tools use (`PreprocessError`, `INPUT_FORMATS`,
`SENTENCE_SPLITTERS`, `open_text`, `resolve_inputs`, `partition_inputs`, `PreprocessSummary`) can all
be imported from here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np

from megatron_dataeff.data.indexed import IndexedDatasetWriter, optimal_dtype, publish_all
# INPUT_FORMATS, open_text and SENTENCE_SPLITTERS are not used here: they are re-exported (see above).
from megatron_dataeff.data.inputs import (  # noqa: F401
    BLOCK_BYTES, INPUT_FORMATS, Piece, PreprocessError, open_text, resolve_inputs)
from megatron_dataeff.data.partitions import partition_inputs, run_partitions
from megatron_dataeff.data.preprocess_summary import PreprocessSummary
from megatron_dataeff.data.sentences import SENTENCE_SPLITTERS, make_sentence_splitter  # noqa: F401
from megatron_dataeff.data.tokenize_blocks import BlockResult, WorkerSpec, raise_interrupt, tokenize_pieces
from megatron_dataeff.data.tokenizers import Tokenizer, build_tokenizer


class _Progress:
    """Progress lines on `stream`, one every `log_interval` documents."""

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
    spec = WorkerSpec(tokenizer.build_args(), keys, append_eod, skip_invalid, np.dtype(dtype).str, splitter=splitter)
    parts = partition_inputs(files, partitions) if partitions > 1 else [[Piece(p, fmt) for p, fmt in files]]
    level = "sentence" if split_sentences else "document"
    summary = PreprocessSummary({k: f"{output_prefix}_{k}_{level}" for k in keys}, files=len(files),
                                input_bytes=total_bytes, dtype=np.dtype(dtype).name, partitions=len(parts))
    progress = _Progress(total_bytes, log_interval, log)
    start = time.time()
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # A plain `kill` unwinds like Ctrl-C, so temporary files are removed.
        old_term = signal.signal(signal.SIGTERM, raise_interrupt)
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


def _run_one(pieces, spec, workers, block_bytes, tokenizer, summary, progress, log) -> None:
    """The whole input in this process (and its pool), straight into the output."""
    writers = [IndexedDatasetWriter(summary.outputs[k], dtype=spec.dtype) for k in spec.keys]

    def on_result(result: BlockResult) -> None:
        summary.add_block(result, spec.keys[0])
        if result.first_invalid and summary.invalid_skipped == result.invalid:
            print(f"skipping invalid record: {result.first_invalid}", file=log, flush=True)
        progress.update(summary.documents, summary.tokens, result.progress)

    try:
        tokenize_pieces(pieces, writers, spec, workers, block_bytes, tokenizer, on_result)
        summary.check_documents([pieces])
        publish_all(writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise
