"""`preprocess --partitions N`: the input cut into N contiguous parts, each tokenized by its own process
(with its share of the workers) into a temporary partial dataset, the partials then merged in order, so
the output is the same bytes as with one partition. Nothing is left behind, whatever happens: the
temporary folder is removed and a failed or stopped run publishes no output.

The tokenizing itself is the engine's (`tokenize_blocks.tokenize_pieces`); each partition's process sends
its counts (`PreprocessSummary.counts`) to the main process, which adds them up.
"""

from __future__ import annotations

import bisect
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile

from megatron_dataeff.data.indexed import IndexedDatasetWriter, publish_all
from megatron_dataeff.data.inputs import Piece, PreprocessError
from megatron_dataeff.data.preprocess_summary import COUNT_FIELDS, PreprocessSummary
from megatron_dataeff.data.tokenize_blocks import (BlockResult, WorkerSpec, mp_context, raise_interrupt,
                                                   tokenize_pieces)


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


def partition_inputs(files: list[tuple[str, str]], partitions: int) -> list[list[Piece]]:
    """`files` cut into at most `partitions` contiguous runs of about equal size, in input order.

    Uncompressed JSONL files are cut between lines wherever a partition boundary falls inside them;
    other files (gzip, text, Parquet, Arrow) go whole to the partition holding their middle byte.
    Partitions left with nothing are dropped."""
    sizes = [os.path.getsize(p) for p, _ in files]
    total = sum(sizes)
    bounds = [total * i // partitions for i in range(1, partitions)]
    parts: list[list[Piece]] = [[] for _ in range(partitions)]
    base = 0
    for (path, fmt), size in zip(files, sizes):
        if fmt == "jsonl" and not path.endswith(".gz") and size > 0:
            inner = [b for b in bounds if base < b < base + size]
            starts = [0] + [_line_start_at_or_after(path, b - base) for b in inner]
            ends = starts[1:] + [size]
            for raw, start, end in zip([base] + inner, starts, ends):
                if end > start:
                    parts[bisect.bisect_right(bounds, raw)].append(Piece(path, fmt, start, end))
        else:
            parts[bisect.bisect_right(bounds, base + size // 2)].append(Piece(path, fmt))
        base += size
    return [p for p in parts if p]


def run_partition(index: int, spec: WorkerSpec, pieces: list[Piece], prefixes: dict, workers: int,
                  block_bytes: int, conn) -> None:
    """One partition's process: `pieces` -> complete datasets at `prefixes` (key -> prefix), reporting
    ("progress", counts, bytes done, first invalid record), then ("done", counts) or ("error", message);
    counts are `PreprocessSummary.counts()`, name -> value."""
    signal.signal(signal.SIGTERM, raise_interrupt)
    counts = PreprocessSummary(dict(prefixes))
    writers: list[IndexedDatasetWriter] = []
    try:
        writers = [IndexedDatasetWriter(prefixes[k], dtype=spec.dtype) for k in spec.keys]

        def on_result(result: BlockResult) -> None:
            counts.add_block(result, spec.keys[0])
            conn.send(("progress", counts.counts(), result.progress, result.first_invalid))

        tokenize_pieces(pieces, writers, spec, workers, block_bytes, None, on_result)
        publish_all(writers)
        conn.send(("done", counts.counts()))
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


def run_partitions(parts: list[list[Piece]], spec: WorkerSpec, workers: int, block_bytes: int,
                   summary: PreprocessSummary, progress, log) -> None:
    """Each part in its own process into a partial dataset (in a temporary folder next to the output),
    then the partials appended in order into the output; the folder is removed whatever happens.
    `progress.update(documents, tokens, bytes done)` is called as the partitions report."""
    n = len(parts)
    shares = [max(1, workers // n + (i < workers % n)) for i in range(n)]
    first = summary.outputs[spec.keys[0]]
    directory = os.path.dirname(os.path.abspath(first))
    os.makedirs(directory, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(first)}.partitions-", dir=directory)
    partial = [{k: os.path.join(tmpdir, f"part{i:04d}_{k}") for k in spec.keys} for i in range(n)]
    ctx = mp_context()
    procs: list = []
    conns: list = []
    writers: list[IndexedDatasetWriter] = []
    latest = [(dict.fromkeys(COUNT_FIELDS, 0), 0) for _ in range(n)]
    finals: dict = {}
    errors: dict = {}
    shown_invalid = False
    try:
        for i in range(n):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_partition, name=f"preprocess-partition-{i}",
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
            progress.update(sum(c["documents"] for c, _ in latest), sum(c["tokens"] for c, _ in latest),
                            sum(b for _, b in latest))
        if errors:
            raise PreprocessError(errors[min(errors)])
        for i in range(n):
            summary.add_counts(finals[i])
        summary.check_documents(parts)
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
