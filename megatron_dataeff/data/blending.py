"""Blending several datasets (`--data-path 0.7 A 0.3 B`) into one data-constrained stream.

Each dataset keeps its own document split, its own share of `--unique-tokens` (proportional to
its weight) and its own per-epoch permutations (`DataConstrainedData`).  Global sample g is drawn
from dataset d(g), chosen by a deterministic schedule that keeps every prefix of the stream as
close to the weights as possible (greedy: the dataset furthest below its share goes next); the
schedule repeats every `BLOCK` samples, so d(g) and the index within dataset d are O(1) for any g,
and the stream position stays one integer.  The blend's epoch is consumed samples / the summed
samples per epoch of the datasets (with weights proportional to sizes, every dataset finishes its
epochs together).  Validation windows are the datasets' validation windows, concatenated.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_dataeff.data.samples import DataConstrainedData
from megatron_dataeff.errors import ConfigError, DataError

BLOCK = 4096


def parse_data_path(items: list[str]) -> tuple[list[str], list[float]]:
    """Megatron's `--data-path`: `PREFIX` or `W1 PREFIX1 W2 PREFIX2 ...` -> (prefixes, weights)."""
    if len(items) == 1:
        return [items[0]], [1.0]
    if len(items) % 2:
        raise ConfigError(f"--data-path: expected PREFIX or pairs of WEIGHT PREFIX, got {items}")
    prefixes, weights = [], []
    for w, prefix in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError as exc:
            raise ConfigError(f"--data-path: {w!r} is not a weight (expected WEIGHT PREFIX pairs)") from exc
        if weight <= 0:
            raise ConfigError(f"--data-path: weight {w} of {prefix} must be positive")
        prefixes.append(prefix)
        weights.append(weight)
    return prefixes, weights


def blend_schedule(weights: list[float], block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset of each position, index of that position within its dataset's share, per-block counts)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    assign = np.empty(block, dtype=np.int64)
    within = np.empty(block, dtype=np.int64)
    for j in range(block):
        d = int(np.argmax(w * (j + 1) - counts))
        assign[j], within[j] = d, counts[d]
        counts[d] += 1
    return assign, within, counts


class BlendedData:
    """The same interface as DataConstrainedData, over several weighted datasets."""

    def __init__(self, prefixes: list[str], weights: list[float], seq_length: int, split_weights: list[float],
                 seed: int, unique_tokens: int | None = None):
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        budgets = [None] * len(prefixes)
        if unique_tokens is not None:
            budgets = [int(round(unique_tokens * x)) for x in w[:-1]]
            budgets.append(unique_tokens - sum(budgets))
        self.parts = [DataConstrainedData(p, seq_length, split_weights, seed + 1000003 * i, unique_tokens=b)
                      for i, (p, b) in enumerate(zip(prefixes, budgets))]
        self.weights = w
        self.prefix = " ".join(f"{x:.4g} {p}" for x, p in zip(w, prefixes))
        self._assign, self._within, self._counts = blend_schedule(list(w))
        self._valid_offsets = np.cumsum([0] + [part.valid_samples for part in self.parts])

    @property
    def unique_tokens(self) -> int:
        return sum(part.unique_tokens for part in self.parts)

    @property
    def samples_per_epoch(self) -> int:
        return sum(part.samples_per_epoch for part in self.parts)

    @property
    def valid_samples(self) -> int:
        return int(self._valid_offsets[-1])

    def epoch_of(self, consumed_samples: int) -> float:
        return consumed_samples / self.samples_per_epoch

    def locate(self, g: int) -> tuple[int, int]:
        """(dataset, sample index within that dataset's stream) of global sample g."""
        blk, j = divmod(int(g), BLOCK)
        d = int(self._assign[j])
        return d, blk * int(self._counts[d]) + int(self._within[j])

    def train_window(self, g: int) -> np.ndarray:
        d, i = self.locate(g)
        return self.parts[d].train_window(i)

    def train_batch(self, start: int, count: int) -> dict:
        tokens = np.stack([self.train_window(g) for g in range(start, start + count)])
        return {"tokens": torch.from_numpy(tokens), "sample_index": torch.arange(start, start + count)}

    def valid_documents(self) -> list[np.ndarray]:
        """Token ids of each validation document, dataset by dataset."""
        return [doc for part in self.parts for doc in part.valid_documents()]

    def valid_batch(self, start: int, count: int) -> dict:
        n = self.valid_samples
        if n == 0:
            raise DataError("the validation split of every --data-path dataset is empty; give --split a valid part")
        rows = []
        for g in range(start, start + count):
            k = g % n
            d = int(np.searchsorted(self._valid_offsets, k, side="right")) - 1
            rows.append(self.parts[d].valid.get(k - int(self._valid_offsets[d])))
        return {"tokens": torch.from_numpy(np.stack(rows)), "sample_index": torch.arange(start, start + count)}


def run_data_path(cfg, tokenizer) -> list[str]:
    """The `--data-path` items of a run (RunConfig), each prefix's .bin/.idx checked to exist, else the
    embedded corpus's prefix (tokenized with `tokenizer` and cached on first use)."""
    from megatron_dataeff.data.corpus import embedded_corpus

    if not cfg.data.data_path:
        return [embedded_corpus(tokenizer, cfg.data.data_cache_dir)]
    prefixes, _ = parse_data_path(list(cfg.data.data_path))
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ConfigError(f"--data-path {prefix}: {prefix + ext} does not exist")
    return list(cfg.data.data_path)


def build_run_data(cfg, data_path: list[str]):
    """The training stream and validation windows of a run (RunConfig) over `data_path`: what the trainer
    trains and validates on, and what the evaluation of its checkpoints validates on."""
    d = cfg.data
    return build_data(data_path, cfg.model.seq_length, d.split_weights, cfg.optim.seed, unique_tokens=d.unique_tokens)


def build_data(data_path: list[str], seq_length: int, split_weights: list[float], seed: int,
               unique_tokens: int | None = None):
    """DataConstrainedData for one prefix, BlendedData for weighted pairs."""
    prefixes, weights = parse_data_path(data_path)
    if len(prefixes) == 1:
        return DataConstrainedData(prefixes[0], seq_length, split_weights, seed, unique_tokens=unique_tokens)
    return BlendedData(prefixes, weights, seq_length, split_weights, seed, unique_tokens=unique_tokens)
