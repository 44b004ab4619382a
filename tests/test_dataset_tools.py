"""Dataset tools: validating reader, merge, subsample to a token budget, back to JSONL, stats."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_dataeff.data.dataset_tools import (choose_documents, dataset_stats, indexed_to_jsonl, iter_documents,
                                                 merge_indexed, subsample_indexed, training_tokens)
from megatron_dataeff.data.indexed import IndexedDatasetWriter, IndexedFormatError, open_indexed, validate_indexed
from megatron_dataeff.data.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["alpha", "", "gamma delta", "é東", "x" * 40, "last one"]


def _dataset(path: Path, texts=TEXTS, vocab_size=258) -> str:
    tok = ByteTokenizer()
    with IndexedDatasetWriter(str(path), vocab_size=vocab_size) as w:
        for t in texts:
            ids = tok.tokenize(t)
            w.add_document(ids + [tok.eod] if ids else [])
    return str(path)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writer_output_reads_in_megatron_core(tmp_path):
    """The writer's files load in megatron-core's IndexedDataset with the documents and sequences given."""
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, vocab_size=70000) as w:
        w.add_document([1, 69999])
        w.add_documents(np.arange(6), seq_lengths=[1, 2, 3], seqs_per_doc=[2, 1])
    ds = open_indexed(prefix)
    assert ds.index.dtype == np.int32 and len(ds) == 4
    assert ds.document_indices.tolist() == [0, 1, 3, 4]
    assert [ds[i].tolist() for i in range(4)] == [[1, 69999], [0], [1, 2], [3, 4, 5]]


@pytest.mark.parametrize("damage,culprit,message", [
    (lambda idx, bin_: idx.write_bytes(b"NOTANIDX" + idx.read_bytes()[8:]), "idx", "bad magic"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:]), "idx",
     "version 2"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-5]), "idx", "truncated or corrupt"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "idx", "truncated header"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "bin", "truncated"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes() + b"\0\0"), "bin", "extra data"),
    (lambda idx, bin_: bin_.unlink(), "bin", "no such file"),
])
def test_validate_names_the_corrupt_file(tmp_path, damage, culprit, message):
    """A damaged .idx/.bin raises IndexedFormatError naming the file and what is wrong."""
    prefix = _dataset(tmp_path / "ds")
    damage(Path(prefix + ".idx"), Path(prefix + ".bin"))
    with pytest.raises(IndexedFormatError) as err:
        open_indexed(prefix)
    assert f"{prefix}.{culprit}" in str(err.value) and message in str(err.value)


def test_merge_concatenates_documents(tmp_path):
    """Merging keeps every document of each input, in order; mixed token dtypes are refused (CLI too)."""
    a = _dataset(tmp_path / "a", TEXTS[:3])
    b = _dataset(tmp_path / "b", TEXTS[3:])
    info = merge_indexed([a, b], str(tmp_path / "ab"))
    merged = [ids.tolist() for _, ids in iter_documents(str(tmp_path / "ab"))]
    assert merged == [ids.tolist() for p in (a, b) for _, ids in iter_documents(p)]
    assert info.num_documents == len(TEXTS) and open_indexed(str(tmp_path / "ab")).sequence_lengths.size == 5
    wide = _dataset(tmp_path / "wide", TEXTS[:1], vocab_size=70000)
    with pytest.raises(ValueError, match="different token dtypes"):
        merge_indexed([a, wide], str(tmp_path / "bad"))
    assert not (tmp_path / "bad.idx").exists()
    assert _tool("merge_datasets").main(["--input", a, b, "--output-prefix", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli.bin").read_bytes() == (tmp_path / "ab.bin").read_bytes()


def test_subsample_budget_in_whole_documents(tmp_path):
    """Subsampling takes whole documents, at most the budget, leaves out none that would still fit,
    keeps source order, and is the same for the same seed (different for another)."""
    rng = np.random.default_rng(0)
    texts = ["w" * int(n) for n in rng.integers(1, 60, size=200)]
    src = _dataset(tmp_path / "src", texts)
    lengths = validate_indexed(src).document_lengths()
    budget = 1500
    info, chosen = subsample_indexed(src, str(tmp_path / "sub"), budget, seed=7)
    assert info.num_tokens == int(lengths[chosen].sum()) <= budget
    left_out = np.setdiff1d(np.arange(lengths.size), chosen)
    assert np.all(info.num_tokens + lengths[left_out] > budget)
    src_docs = [ids.tolist() for _, ids in iter_documents(src)]
    assert [ids.tolist() for _, ids in iter_documents(str(tmp_path / "sub"))] == [src_docs[d] for d in chosen]
    again = choose_documents(lengths, budget, seed=7)
    assert again.tolist() == chosen.tolist()
    assert choose_documents(lengths, budget, seed=8).tolist() != chosen.tolist()
    at_least = choose_documents(lengths, budget, seed=7, at_least=True)
    order = np.random.default_rng(7).permutation(lengths.size).tolist()
    last = max(at_least.tolist(), key=order.index)  # the document that reached the budget
    total = int(lengths[at_least].sum())
    assert total >= budget > total - lengths[last]
    assert _tool("subsample_dataset").main(["--input", src, "--tokens", "1500", "--seed", "7", "--output-prefix",
                                            str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli.idx").read_bytes() == (tmp_path / "sub.idx").read_bytes()


def test_to_jsonl_round_trip(tmp_path):
    """indexed -> JSONL (EOD dropped, detokenized) gives back the original texts; the CLI writes a file."""
    src = _dataset(tmp_path / "ds")
    out = io.StringIO()
    assert indexed_to_jsonl(src, out, ByteTokenizer()) == len(TEXTS)
    assert [json.loads(line)["text"] for line in out.getvalue().splitlines()] == TEXTS
    target = tmp_path / "back.jsonl"
    assert _tool("indexed_to_jsonl").main(["--input", src, "--output", str(target), "--tokenizer-type",
                                           "ByteTokenizer", "--limit", "2", "--with-ids"]) == 0
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == TEXTS[:2] and rows[0]["ids"] == list(b"alpha")


def test_stats_and_epochs(tmp_path, capsys):
    """Stats count documents/tokens, bucket lengths, and give epochs = train tokens / unique tokens."""
    src = _dataset(tmp_path / "ds")
    stats = dataset_stats(src, unique_tokens=20, train_tokens=training_tokens(train_iters=5, global_batch_size=2,
                                                                              seq_length=10))
    lengths = [len(t.encode()) + 1 if t else 0 for t in TEXTS]
    assert (stats.documents, stats.tokens, stats.empty_documents) == (6, sum(lengths), 1)
    assert stats.doc_length_max == max(lengths) and stats.epochs == pytest.approx(100 / 20)
    assert sum(c for _, _, c in stats.histogram) == 6
    assert dataset_stats(src, train_tokens=2 * sum(lengths)).epochs == pytest.approx(2.0)
    with pytest.raises(ValueError, match="--global-batch-size"):
        training_tokens(train_iters=5)
    assert _tool("dataset_stats").main(["--input", src, "--train-tokens", "1000"]) == 0
    assert "epochs" in capsys.readouterr().out
