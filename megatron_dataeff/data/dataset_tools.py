"""Operations on Megatron indexed datasets: back to JSONL, merge, subsample to a token budget, stats.

All of them read through `indexed.validate_indexed` (so a corrupt pair is named, not mis-read) and
write through `IndexedDatasetWriter` (so output appears only when complete).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

import numpy as np

from megatron_dataeff.data.indexed import IndexedDatasetWriter, IndexInfo, bin_memmap, read_document, validate_indexed
from megatron_dataeff.data.tokenizers import Tokenizer
from megatron_dataeff.errors import ConfigError, DataError


def iter_documents(prefix: str):
    """(document index, token ids [n]) of every document, in order."""
    info = validate_indexed(prefix)
    data = bin_memmap(info)
    for d in range(info.num_documents):
        yield d, read_document(data, info, d)


def indexed_to_jsonl(prefix: str, out: TextIO, tokenizer: Tokenizer, key: str = "text", strip_eod: bool = True,
                     limit: Optional[int] = None, with_ids: bool = False) -> int:
    """Write each document detokenized as a JSON line `{key: text}`; returns the number written.

    A trailing EOD (what `--append-eod` added) is dropped first when `strip_eod`."""
    eod = None
    if strip_eod:
        try:
            eod = tokenizer.eod
        except ValueError:  # a tokenizer without an EOD
            pass
    n = 0
    for d, ids in iter_documents(prefix):
        if limit is not None and n >= limit:
            break
        ids = np.asarray(ids)
        if eod is not None and ids.size and int(ids[-1]) == eod:
            ids = ids[:-1]
        record = {key: tokenizer.detokenize(ids.tolist())}
        if with_ids:
            record = {"document": d, **record, "ids": ids.tolist()}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n


def merge_indexed(prefixes: Sequence[str], output_prefix: str) -> IndexInfo:
    """Concatenate datasets (same token dtype) into one, documents in the order given."""
    if not prefixes:
        raise ConfigError("nothing to merge: --input names no dataset")
    infos = [validate_indexed(p) for p in prefixes]
    dtypes = {str(i.dtype) for i in infos}
    if len(dtypes) != 1:
        raise DataError("datasets to merge have different token dtypes: "
                         + ", ".join(f"{i.prefix} ({i.dtype})" for i in infos))
    with IndexedDatasetWriter(output_prefix, dtype=infos[0].dtype) as w:
        for p in prefixes:
            w.add_index(p)
    return validate_indexed(output_prefix)


def choose_documents(doc_lengths: np.ndarray, token_budget: int, seed: int, at_least: bool = False) -> np.ndarray:
    """Indices (sorted) of whole documents drawn in a seeded random order to fill `token_budget`.

    Default: every document that still fits is taken, so the total is <= the budget and no document
    left out would fit. `at_least`: documents are taken until the total reaches the budget (the last
    one may overshoot)."""
    if token_budget <= 0:
        raise ConfigError(f"the token budget must be positive, got {token_budget}")
    order = np.random.default_rng(seed).permutation(doc_lengths.size)
    lengths = doc_lengths[order]
    if at_least:
        csum = np.cumsum(lengths)
        stop = int(np.searchsorted(csum, token_budget, side="left")) + 1
        return np.sort(order[:stop])
    chosen = np.zeros(doc_lengths.size, dtype=bool)
    total = 0
    for i, n in zip(order.tolist(), lengths.tolist()):
        if total + n <= token_budget:
            chosen[i] = True
            total += n
            if total == token_budget:
                break
    return np.flatnonzero(chosen)


def subsample_indexed(prefix: str, output_prefix: str, token_budget: int, seed: int = 1234,
                      at_least: bool = False) -> tuple[IndexInfo, np.ndarray]:
    """Write the documents `choose_documents` picks (kept in their original order, sequences intact);
    returns the new dataset's index and the chosen document indices of the source."""
    info = validate_indexed(prefix)
    chosen = choose_documents(info.document_lengths(), token_budget, seed, at_least)
    data = bin_memmap(info)
    with IndexedDatasetWriter(output_prefix, dtype=info.dtype) as w:
        for d in chosen.tolist():
            s0, s1 = int(info.document_indices[d]), int(info.document_indices[d + 1])
            w.add_document(read_document(data, info, d), info.sequence_lengths[s0:s1])
    return validate_indexed(output_prefix), chosen


@dataclass
class DatasetStats:
    """Counts of one indexed dataset and what a token budget implies."""

    prefix: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    empty_documents: int
    doc_length_min: int
    doc_length_mean: float
    doc_length_median: float
    doc_length_max: int
    histogram: list  # [(low, high, count)] over document lengths, power-of-two buckets
    unique_tokens: Optional[int] = None
    train_tokens: Optional[int] = None
    epochs: Optional[float] = None

    def describe(self) -> str:
        lines = [f"dataset:   {self.prefix} ({self.dtype})",
                 f"documents: {self.documents:,} ({self.empty_documents:,} empty), sequences: {self.sequences:,}",
                 f"tokens:    {self.tokens:,}",
                 f"doc length: min {self.doc_length_min:,}, mean {self.doc_length_mean:,.1f}, median "
                 f"{self.doc_length_median:,.0f}, max {self.doc_length_max:,}",
                 "length histogram (tokens per document):"]
        peak = max((c for _, _, c in self.histogram), default=1) or 1
        for lo, hi, count in self.histogram:
            lines.append(f"  [{lo:>9,}, {hi:>9,}) {count:>10,} {'#' * max(1 if count else 0, round(40 * count / peak))}")
        if self.train_tokens is not None:
            unique = self.unique_tokens if self.unique_tokens is not None else self.tokens
            lines.append(f"training:  {self.train_tokens:,} tokens over {unique:,} unique tokens = "
                         f"{self.epochs:,.2f} epochs")
            if self.unique_tokens is not None and self.unique_tokens > self.tokens:
                lines.append(f"warning:   --unique-tokens {self.unique_tokens:,} exceeds the dataset's "
                             f"{self.tokens:,} tokens")
        elif self.unique_tokens is not None:
            lines.append(f"unique:    {self.unique_tokens:,} tokens = {self.unique_tokens / max(self.tokens, 1):.2%} "
                         "of the dataset (give --train-tokens or --train-iters for epochs)")
        return "\n".join(lines)


def training_tokens(train_tokens: Optional[int] = None, train_iters: Optional[int] = None,
                    global_batch_size: Optional[int] = None, seq_length: Optional[int] = None) -> Optional[int]:
    """Tokens a run consumes: `train_tokens`, else iterations x global batch x sequence length."""
    if train_tokens is not None:
        return int(train_tokens)
    given = [train_iters, global_batch_size, seq_length]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise ConfigError("--train-iters needs --global-batch-size and --seq-length")
    return int(train_iters) * int(global_batch_size) * int(seq_length)


def dataset_stats(prefix: str, unique_tokens: Optional[int] = None, train_tokens: Optional[int] = None) -> DatasetStats:
    """Counts, document-length summary and histogram; epochs = train_tokens / unique tokens (the
    dataset's own size when `unique_tokens` is not given)."""
    info = validate_indexed(prefix)
    lengths = info.document_lengths()
    top = int(lengths.max()) if lengths.size else 0
    edges = [0, 1] + [2 ** k for k in range(1, max(1, math.ceil(math.log2(top + 1))) + 1)]
    counts, _ = np.histogram(lengths, bins=edges) if lengths.size else (np.zeros(len(edges) - 1, int), None)
    histogram = [(edges[i], edges[i + 1], int(c)) for i, c in enumerate(counts)]
    while histogram and histogram[-1][2] == 0:
        histogram.pop()
    epochs = None
    if train_tokens is not None:
        denom = unique_tokens if unique_tokens is not None else info.num_tokens
        epochs = train_tokens / denom if denom else float("inf")
    return DatasetStats(
        prefix=prefix, dtype=str(info.dtype), documents=info.num_documents, sequences=info.num_sequences,
        tokens=info.num_tokens, empty_documents=int(np.count_nonzero(lengths == 0)),
        doc_length_min=int(lengths.min()) if lengths.size else 0,
        doc_length_mean=float(lengths.mean()) if lengths.size else 0.0,
        doc_length_median=float(np.median(lengths)) if lengths.size else 0.0, doc_length_max=top,
        histogram=histogram, unique_tokens=unique_tokens, train_tokens=train_tokens, epochs=epochs)
