"""What a `preprocess` run wrote: `PreprocessSummary`, its counts summed over blocks and partitions.

The counts are the summary's fields marked `_count()`; `COUNT_FIELDS` lists them, in field order, and
every place that adds or sends counts goes by these names, so a new count is declared once, on its field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from megatron_dataeff.data.inputs import PreprocessError
from megatron_dataeff.data.tokenize_blocks import BlockResult


def _count():
    """A field summed over the blocks of a run (and over its partitions)."""
    return dataclasses.field(default=0, metadata={"count": True})


@dataclass
class PreprocessSummary:
    """What a run wrote."""

    outputs: dict  # key -> dataset prefix
    documents: int = _count()
    sequences: int = _count()
    tokens: int = _count()
    empty_documents: int = _count()
    input_bytes: int = 0
    seconds: float = 0.0
    invalid_skipped: int = _count()
    blank_lines: int = _count()
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

    def add_block(self, result: BlockResult, key: str) -> None:
        """Count a written block (`key`: the key whose sequences and tokens are counted)."""
        out = result.outputs[key]
        self.add_counts(dict(documents=result.documents, sequences=int(out.seq_lengths.size),
                             tokens=int(out.ids.size), empty_documents=int(np.count_nonzero(out.seqs_per_doc == 0)),
                             invalid_skipped=result.invalid, blank_lines=result.blank))

    def counts(self) -> dict:
        """The counts, name -> value (what a partition's process sends to the main one)."""
        return {name: getattr(self, name) for name in COUNT_FIELDS}

    def add_counts(self, counts: dict) -> None:
        """Add `counts` (name -> value, every one of `COUNT_FIELDS`)."""
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + counts[name])

    def check_documents(self, parts) -> None:
        """Stop the run if it wrote no documents; `parts`: the lists of `Piece`s it read."""
        if self.documents == 0:
            what = "valid documents" if self.invalid_skipped else "documents"
            names = dict.fromkeys(p.path for part in parts for p in part)
            raise PreprocessError(f"no {what} in input {', '.join(names)}")


COUNT_FIELDS = tuple(f.name for f in dataclasses.fields(PreprocessSummary) if f.metadata.get("count"))
