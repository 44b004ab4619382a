"""The data-constrained sample stream: a fixed set of unique tokens, seen for many epochs.

From a Megatron indexed dataset (read with megatron-core's `IndexedDataset`):

1. Documents are split into train / valid / test by `--split`, after one shuffle with a fixed
   split seed.  The split does not depend on `--seed` or `--unique-tokens`, so every run of a study
   validates on the same documents, and never trains on them.
2. The training set is the shuffled training documents, concatenated (EOD-separated as written by
   the preprocessor), cut to exactly `--unique-tokens` tokens when given.
3. That token stream is cut into `num_samples` windows of seq_length + 1 tokens (consecutive
   windows share one token, as in Megatron's GPTDataset).
4. Global sample g of the run is window `perm_e[g % num_samples]` of epoch e = g // num_samples,
   where perm_e is a fresh permutation seeded by (seed, e).  So each epoch is a permutation of the
   same windows, `epoch = g / num_samples` is fractional, and the position of a run in the stream is
   one integer (the number of consumed samples), which checkpoints restore.

Validation windows are taken in order from the validation documents, with no shuffle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_dataeff.errors import DataError

if TYPE_CHECKING:  # for annotations only
    from megatron.core.datasets.indexed_dataset import IndexedDataset

SPLIT_SEED = 20251004  # fixed: the train/valid split is the same for every run of a dataset


def load_indexed(prefix: str):
    """megatron-core's IndexedDataset of PREFIX.idx/.bin (memory-mapped); a clear error naming them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        return IndexedDataset(prefix, multimodal=False, mmap=True)
    except Exception as exc:
        raise DataError(f"cannot read indexed dataset {prefix}.idx/.bin: {exc}") from exc


class TokenWindows:
    """Windows of `window` tokens over the concatenation of some sequences of an indexed dataset."""

    def __init__(self, dataset: IndexedDataset, sequence_ids: np.ndarray, window: int, max_tokens: int | None = None):
        self.dataset = dataset
        self.window = int(window)
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)[sequence_ids]
        cum = np.cumsum(lengths)
        if max_tokens is not None:
            if cum.size == 0 or cum[-1] < max_tokens:
                have = int(cum[-1]) if cum.size else 0
                raise DataError(f"--unique-tokens {max_tokens} exceeds the {have} tokens of the training split")
            keep = int(np.searchsorted(cum, max_tokens, side="left")) + 1
            sequence_ids, lengths, cum = sequence_ids[:keep], lengths[:keep].copy(), cum[:keep].copy()
            lengths[-1] -= cum[-1] - max_tokens
            cum[-1] = max_tokens
        self.sequence_ids = sequence_ids
        self.lengths = lengths
        self.ends = cum  # end offset of each sequence in the stream
        self.num_tokens = int(cum[-1]) if cum.size else 0
        self.num_samples = max(0, (self.num_tokens - 1) // (self.window - 1))

    def __len__(self) -> int:
        return self.num_samples

    def get(self, k: int) -> np.ndarray:
        """Window k: stream tokens [k*(window-1), k*(window-1) + window)."""
        if not 0 <= k < self.num_samples:
            raise IndexError(f"window {k} out of range [0, {self.num_samples})")
        start = k * (self.window - 1)
        end = start + self.window
        out = np.empty(self.window, dtype=np.int64)
        i = int(np.searchsorted(self.ends, start, side="right"))
        pos, filled = start, 0
        while filled < self.window:
            seq_start = int(self.ends[i] - self.lengths[i])
            offset = pos - seq_start
            take = min(int(self.ends[i]) - pos, end - pos)
            out[filled:filled + take] = self.dataset.get(int(self.sequence_ids[i]), offset=offset, length=take)
            filled += take
            pos += take
            i += 1
        return out


def split_documents(num_documents: int, weights: list[float]) -> list[np.ndarray]:
    """Document ids of (train, valid, test): one fixed shuffle, then contiguous parts by weight."""
    order = np.random.default_rng(SPLIT_SEED).permutation(num_documents)
    bounds = np.round(np.cumsum([0.0] + list(weights)) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [order[bounds[i]:bounds[i + 1]] for i in range(3)]


def documents_to_sequences(dataset: IndexedDataset, doc_ids: np.ndarray) -> np.ndarray:
    """Sequence ids of documents `doc_ids` of an indexed dataset, in order."""
    doc_index = np.asarray(dataset.document_indices, dtype=np.int64)
    if len(doc_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(doc_index[d], doc_index[d + 1]) for d in doc_ids]).astype(np.int64)


class DataConstrainedData:
    """Training stream and validation windows of one indexed dataset."""

    def __init__(self, prefix: str, seq_length: int, split_weights: list[float], seed: int,
                 unique_tokens: int | None = None):
        self.prefix = prefix
        self.dataset = load_indexed(prefix)
        self.seed = int(seed)
        num_docs = len(self.dataset.document_indices) - 1
        train_docs, valid_docs, test_docs = split_documents(num_docs, split_weights)
        self.valid_docs = valid_docs
        window = seq_length + 1
        self.train = TokenWindows(self.dataset, documents_to_sequences(self.dataset, train_docs), window,
                                  max_tokens=unique_tokens)
        self.valid = TokenWindows(self.dataset, documents_to_sequences(self.dataset, valid_docs), window)
        self.test = TokenWindows(self.dataset, documents_to_sequences(self.dataset, test_docs), window)
        if len(self.train) == 0:
            raise DataError(f"{prefix}: the training split has fewer than {window} tokens "
                             f"(--seq-length {seq_length}, --split, --unique-tokens)")
        self._perm_epoch = -1
        self._perm = None

    @property
    def unique_tokens(self) -> int:
        """Tokens in the training set."""
        return self.train.num_tokens

    @property
    def samples_per_epoch(self) -> int:
        """Training windows in one pass over the unique tokens."""
        return len(self.train)

    @property
    def valid_samples(self) -> int:
        """Validation windows."""
        return len(self.valid)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(len(self.train))
            self._perm_epoch = epoch
        return self._perm

    def epoch_of(self, consumed_samples: int) -> float:
        """Fractional epochs after `consumed_samples` training samples."""
        return consumed_samples / len(self.train)

    def train_window(self, g: int) -> np.ndarray:
        """Tokens [seq_length + 1] of global training sample g."""
        n = len(self.train)
        epoch, pos = divmod(int(g), n)
        return self.train.get(int(self._permutation(epoch)[pos]))

    def train_batch(self, start: int, count: int) -> dict:
        """Global samples start..start+count-1: tokens [count, seq+1] and sample_index [count]."""
        index = torch.arange(start, start + count, dtype=torch.int64)
        tokens = np.stack([self.train_window(g) for g in range(start, start + count)]) if count else (
            np.zeros((0, self.train.window), dtype=np.int64))
        return {"tokens": torch.from_numpy(tokens), "sample_index": index}

    def valid_documents(self) -> list[np.ndarray]:
        """Token ids of each validation document (split order)."""
        return [np.concatenate([self.dataset.get(int(q)) for q in documents_to_sequences(self.dataset, np.array([d]))])
                for d in self.valid_docs]

    def valid_batch(self, start: int, count: int) -> dict:
        """Validation windows start..start+count-1 (modulo the number of windows)."""
        n = len(self.valid)
        if n == 0:
            raise DataError(f"{self.prefix}: the validation split is empty; give --split with a valid part")
        index = torch.arange(start, start + count, dtype=torch.int64)
        tokens = np.stack([self.valid.get(int(g) % n) for g in range(start, start + count)])
        return {"tokens": torch.from_numpy(tokens), "sample_index": index}
