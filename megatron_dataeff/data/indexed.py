"""Megatron indexed datasets (`{prefix}.bin` + `{prefix}.idx`): an atomic writer and a validating reader.

The `.idx` layout (megatron-core `indexed_dataset.py`): `b"MMIDIDX\\x00\\x00"`, `<Q` version 1, `<B` dtype
code, `<Q` sequence count, `<Q` document-index count (documents + 1), int32 sequence lengths, int64
byte pointers, int64 document indices (sequence index where each document starts; first 0, last the
sequence count). The `.bin` holds the token ids back to back.

`IndexedDatasetWriter` writes under temporary names, fsyncs, then renames the `.bin` and only then the
`.idx`: a killed writer never leaves a pair that looks complete. megatron-core's `IndexedDataset` does
the reading; `validate_indexed` checks a pair first and names the file at fault.

    with IndexedDatasetWriter("out/corpus_text_document", vocab_size=tok.vocab_size) as w:
        for text in texts:
            w.add_document(tok.tokenize(text) + [tok.eod])
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_dataeff.atomic import replace_file
from megatron_dataeff.errors import DataError, UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedFormatError(UserError, ValueError):
    """A `.bin/.idx` pair that is not a valid Megatron indexed dataset."""


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """Megatron's choice: uint16 when the vocabulary is < 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Writes `{prefix}.bin/.idx` atomically; usable as a context manager (aborts on an exception).

    A document is one or more sequences (Megatron's sentence-level datasets); `add_document(ids)`
    makes it one. A document with no tokens is recorded with no sequences, as Megatron-LM does.
    """

    def __init__(self, prefix: str, vocab_size: Optional[int] = None, dtype=None):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype if dtype is not None else optimal_dtype(vocab_size))
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.vocab_size = vocab_size
        directory = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(directory, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{id(self):x}"
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        self._tmp_bin, self._tmp_idx = self.bin_path + tag, self.idx_path + tag
        self._bin = open(self._tmp_bin, "wb")
        self._seq_lengths: list[np.ndarray] = []
        self._seqs_per_doc: list[np.ndarray] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._done = False

    # -- adding data --------------------------------------------------------------------------------
    def add_document(self, ids, lengths: Optional[Sequence[int]] = None) -> None:
        """One document: `ids` [n_tokens], split into sequences of `lengths` (default: one sequence)."""
        arr = self._as_tokens(ids)
        if lengths is None:
            lengths = [arr.size] if arr.size else []
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != arr.size:
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())}, document has {arr.size} tokens")
        self._append(arr, lengths, np.asarray([lengths.size], dtype=np.int64))

    def add_documents(self, flat_ids, seq_lengths, seqs_per_doc=None) -> None:
        """Many documents at once: `flat_ids` [n_tokens], `seq_lengths` [n_seqs], `seqs_per_doc`
        [n_docs] (default: one sequence per document)."""
        arr = self._as_tokens(flat_ids)
        seq_lengths = np.asarray(seq_lengths, dtype=np.int64)
        if int(seq_lengths.sum()) != arr.size:
            raise ValueError(f"sequence lengths sum to {int(seq_lengths.sum())}, got {arr.size} tokens")
        if seqs_per_doc is None:
            seqs_per_doc = np.ones(seq_lengths.size, dtype=np.int64)
        seqs_per_doc = np.asarray(seqs_per_doc, dtype=np.int64)
        if int(seqs_per_doc.sum()) != seq_lengths.size:
            raise ValueError("seqs_per_doc does not add up to the number of sequences")
        self._append(arr, seq_lengths, seqs_per_doc)

    def add_index(self, prefix: str) -> None:
        """Append every document of the indexed dataset at `prefix` (same dtype), copying its bytes."""
        info = validate_indexed(prefix)
        if info.dtype != self.dtype:
            raise DataError(f"{prefix}.idx has dtype {info.dtype}, this dataset is {self.dtype}")
        self._seq_lengths.append(info.sequence_lengths.astype(np.int64))
        self._seqs_per_doc.append(np.diff(info.document_indices))
        with open(prefix + ".bin", "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)
        self.num_tokens += info.num_tokens
        self.num_documents += info.num_documents

    def _as_tokens(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and arr.dtype != self.dtype:
            if self.dtype.kind in "iu":
                lo, hi = np.iinfo(self.dtype).min, np.iinfo(self.dtype).max
                if arr.min() < lo or arr.max() > hi:
                    raise ValueError(f"token ids outside {self.dtype} range [{lo}, {hi}]")
            arr = arr.astype(self.dtype)
        return arr

    def _append(self, arr: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: np.ndarray) -> None:
        if self._done:
            raise RuntimeError("writer already finalized or aborted")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).data)
        self._seq_lengths.append(seq_lengths)
        self._seqs_per_doc.append(seqs_per_doc)
        self.num_tokens += int(arr.size)
        self.num_documents += int(seqs_per_doc.size)

    # -- publishing ---------------------------------------------------------------------------------
    def finalize(self, publish: bool = True) -> None:
        """Write the index and (when `publish`) rename both files into place: `.bin` first."""
        if self._done:
            raise RuntimeError("writer already finalized or aborted")
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.concatenate(self._seq_lengths) if self._seq_lengths else np.zeros(0, np.int64)
            per_doc = np.concatenate(self._seqs_per_doc) if self._seqs_per_doc else np.zeros(0, np.int64)
            if lengths.size and lengths.max() > np.iinfo(np.int32).max:
                raise ValueError("a sequence is longer than 2**31 - 1 tokens")
            pointers = np.zeros(lengths.size, dtype=np.int64)
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
            doc_index = np.zeros(per_doc.size + 1, dtype=np.int64)
            np.cumsum(per_doc, out=doc_index[1:])
            with open(self._tmp_idx, "wb") as f:
                f.write(INDEX_HEADER)
                f.write(struct.pack("<Q", 1))
                f.write(struct.pack("<B", _CODE_OF[self.dtype]))
                f.write(struct.pack("<Q", lengths.size))
                f.write(struct.pack("<Q", doc_index.size))
                f.write(lengths.astype(np.int32).tobytes())
                f.write(pointers.tobytes())
                f.write(doc_index.tobytes())
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.abort()
            raise
        self._done = True
        if publish:
            self.publish()

    def publish(self) -> None:
        """Rename the finished temporary files into place (after `finalize(publish=False)`)."""
        # An old .idx next to the new .bin would look complete: remove it before touching the .bin.
        if os.path.exists(self.idx_path):
            os.unlink(self.idx_path)
        replace_file(self._tmp_bin, self.bin_path)
        replace_file(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        """Drop everything written so far; nothing is left on disk."""
        self._done = True
        try:
            self._bin.close()
        except OSError:
            pass
        for path in (self._tmp_bin, self._tmp_idx):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


def publish_all(writers: Sequence[IndexedDatasetWriter]) -> None:
    """Finalize several writers, then rename every `.bin` before any `.idx`."""
    try:
        for w in writers:
            w.finalize(publish=False)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        if os.path.exists(w.idx_path):
            os.unlink(w.idx_path)
    for w in writers:
        replace_file(w._tmp_bin, w.bin_path)
    for w in writers:
        replace_file(w._tmp_idx, w.idx_path)


@dataclass
class IndexInfo:
    """The arrays of a validated `.idx` and what they imply."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # [n_seqs] int32
    sequence_pointers: np.ndarray  # [n_seqs] int64 byte offsets into the .bin
    document_indices: np.ndarray  # [n_docs + 1] int64

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size - 1)

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document_lengths(self) -> np.ndarray:
        """Tokens per document [n_docs] int64."""
        csum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return csum[self.document_indices[1:]] - csum[self.document_indices[:-1]]


def validate_indexed(prefix: str) -> IndexInfo:
    """Check `{prefix}.idx` and `{prefix}.bin` against each other; raise `IndexedFormatError` naming the
    file for a bad magic, version or dtype, truncation, or sizes and pointers that do not add up."""
    prefix = str(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise IndexedFormatError(f"{path}: no such file")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < len(INDEX_HEADER) or head[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise IndexedFormatError(f"{idx_path}: not a Megatron index (bad magic {head[:9]!r})")
    if len(head) < _HEADER_BYTES:
        raise IndexedFormatError(f"{idx_path}: truncated header ({size} bytes)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
    if version != 1:
        raise IndexedFormatError(f"{idx_path}: unsupported version {version} (expected 1)")
    if code not in DTYPE_CODES:
        raise IndexedFormatError(f"{idx_path}: unknown dtype code {code}")
    dtype = np.dtype(DTYPE_CODES[code])
    expected = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    # megatron-core may append one int8 mode per sequence (multimodal datasets).
    if size not in (expected, expected + n_seq):
        raise IndexedFormatError(f"{idx_path}: {size} bytes, but {n_seq} sequences and {n_doc} document "
                                 f"indices need {expected} (truncated or corrupt)")
    if n_doc < 1:
        raise IndexedFormatError(f"{idx_path}: document index is empty (needs a leading 0)")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    off = _HEADER_BYTES
    lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=off)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
    doc_index = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
    if n_seq and lengths.min() < 0:
        raise IndexedFormatError(f"{idx_path}: negative sequence length")
    if doc_index[0] != 0 or doc_index[-1] != n_seq or (n_doc > 1 and np.any(np.diff(doc_index) < 0)):
        raise IndexedFormatError(f"{idx_path}: document indices must rise from 0 to the sequence count {n_seq}")
    byte_lengths = lengths.astype(np.int64) * dtype.itemsize
    if n_seq and (pointers[0] != 0 or np.any(pointers[1:] != np.cumsum(byte_lengths)[:-1])):
        raise IndexedFormatError(f"{idx_path}: sequence pointers do not match the sequence lengths")
    want = int(byte_lengths.sum())
    have = os.path.getsize(bin_path)
    if have != want:
        raise IndexedFormatError(f"{bin_path}: {have} bytes, but {idx_path} describes {want} "
                                 f"({'truncated' if have < want else 'extra data'})")
    return IndexInfo(prefix, dtype, lengths, pointers, doc_index)


def open_indexed(prefix: str):
    """megatron-core's `IndexedDataset` at `prefix`, after `validate_indexed`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    validate_indexed(prefix)
    return IndexedDataset(str(prefix), multimodal=False, mmap=True)


def read_document(bin_map: np.ndarray, info: IndexInfo, doc: int) -> np.ndarray:
    """All tokens of document `doc` [n_tokens], from `bin_memmap(info)`."""
    s0, s1 = int(info.document_indices[doc]), int(info.document_indices[doc + 1])
    if s0 == s1:
        return np.zeros(0, dtype=info.dtype)
    start = int(info.sequence_pointers[s0]) // info.dtype.itemsize
    count = int(info.sequence_lengths[s0:s1].sum(dtype=np.int64))
    return bin_map[start:start + count]


def bin_memmap(info: IndexInfo) -> np.ndarray:
    """The `.bin` as a read-only array of token ids [n_tokens]."""
    if info.num_tokens == 0:
        return np.zeros(0, dtype=info.dtype)
    return np.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r")


def check_token_ids(prefix: str, vocab_size: int, chunk: int = 1 << 26) -> None:
    """Refuse a dataset holding a token id >= vocab_size (the tokenizer's ids), naming the file, the id and its
    position.  Skipped when the dtype cannot hold such an id; otherwise one pass over the `.bin`."""
    info = validate_indexed(prefix)
    if np.iinfo(info.dtype).max < vocab_size:
        return
    tokens = bin_memmap(info)
    for start in range(0, tokens.size, chunk):
        part = np.asarray(tokens[start:start + chunk])
        if part.size and int(part.max()) >= vocab_size:
            where = start + int(np.argmax(part >= vocab_size))
            raise IndexedFormatError(
                f"{prefix}.bin: token id {int(tokens[where])} at token {where} is outside the vocabulary of "
                f"{vocab_size} ids of this tokenizer (--tokenizer-type/--tokenizer-model/--vocab-size); was the "
                f"dataset made with another tokenizer?")
