"""Data: tokenizers, indexed datasets, the embedded corpus and the data-constrained sample stream."""
