"""Random-token datasets for benchmarks and memory measurements, where the content does not matter.

`null_tokenizer_vocab(padded)` is the `--vocab-size` of a NullTokenizer whose model vocabulary pads to
exactly `padded` rows: NullTokenizer(V) emits V + 1 ids (EOD = V) and the trainer adds a mask id, so
V + 2 ids (e.g. 151,934 for Qwen3's 151,936 rows).
"""

from __future__ import annotations

import numpy as np

from megatron_dataeff.data.indexed import IndexedDatasetWriter


def null_tokenizer_vocab(padded: int) -> int:
    """`--vocab-size` of a NullTokenizer whose ids (EOD and mask token included) number exactly `padded`."""
    if padded < 3:
        raise ValueError(f"a padded vocabulary of {padded} rows leaves no room for EOD and the mask token")
    return padded - 2


def write_random_dataset(prefix: str, vocab_size: int, num_docs: int = 64, doc_tokens: int = 8192,
                         seed: int = 0) -> str:
    """A Megatron indexed dataset `{prefix}.bin/.idx` of `num_docs` documents of uniform random ids in
    [0, vocab_size), each ended by EOD = vocab_size (the NullTokenizer convention); returns the prefix."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, vocab_size=vocab_size + 1) as writer:
        for _ in range(num_docs):
            writer.add_document(np.append(rng.integers(0, vocab_size, doc_tokens), vocab_size))
    return prefix
