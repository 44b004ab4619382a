"""tools/preprocess_data.py and data/preprocess.py: round trips, Megatron parity, bad input, atomic output."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_dataeff.data.indexed import IndexedDatasetWriter, validate_indexed
from megatron_dataeff.data.preprocess import PreprocessError, preprocess
from megatron_dataeff.data.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
BPE_DIR = str(ASSETS / "tokenizers" / "bpe")
SP_MODEL = str(ASSETS / "tokenizers" / "sp.model")
TEXTS = ["Hello, world!", "", "naïve 東京 😀 ß\n\n\ttab  end ", "<|endoftext|> and [MASK] inside", "x" * 500,
         "ΑΒΓ", " ", "the data model"]


def _write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _documents(prefix: str) -> list[np.ndarray]:
    """Every document's ids, read with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    out = []
    for d in range(len(ds.document_indices) - 1):
        s0, s1 = ds.document_indices[d], ds.document_indices[d + 1]
        parts = [ds[i] for i in range(s0, s1)]
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=ds.index.dtype))
    return out


@pytest.mark.parametrize("name", ["ByteTokenizer", "HuggingFaceTokenizer"])
def test_round_trip_lossless(tmp_path, name):
    """preprocess -> megatron-core IndexedDataset -> detokenize gives back every input text; each
    non-empty document ends in EOD, an empty one has no sequences (as Megatron-LM writes it)."""
    tok = build_tokenizer(name, BPE_DIR if name == "HuggingFaceTokenizer" else None)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t, "n": i} for i, t in enumerate(TEXTS)])
    summary = preprocess([str(src)], str(tmp_path / "out"), tok, append_eod=True, log_stream=open(os.devnull, "w"))
    prefix = summary.outputs["text"]
    docs = _documents(prefix)
    assert len(docs) == len(TEXTS) == summary.documents
    for text, ids in zip(TEXTS, docs):
        if tok.tokenize(text):
            assert int(ids[-1]) == tok.eod
            got = tok.detokenize(ids[:-1].tolist())
            # The HF tokenizer recognises its special tokens in text and detokenize drops them.
            want = text if name == "ByteTokenizer" else text.replace("<|endoftext|>", "").replace("[MASK]", "")
            assert got == want
        else:
            assert ids.size == 0
    info = validate_indexed(prefix)
    assert info.dtype == np.uint16 and summary.tokens == info.num_tokens


def _megatron_reference(prefix: str, tok_megatron, texts, dtype):
    """What Megatron-LM's preprocess does per document, built with megatron-core's own writer."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for text in texts:
        ids = tok_megatron.text_to_ids(text)
        lens = [len(ids)] if ids else []
        if ids:
            ids = ids + [tok_megatron.eod]
            lens[-1] += 1
        builder.add_document(ids, lens)
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("name", ["HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_bytes_match_megatron_core_builder(tmp_path, name):
    """Our .bin/.idx are byte-identical to megatron-core's IndexedDatasetBuilder fed by megatron-core's
    tokenizer wrapper, with Megatron-LM's per-document --append-eod logic (workers=2 path)."""
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer as MHF
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer as MSP

    corpus = [json.loads(line)["text"] for line in open(ASSETS / "corpus.jsonl", encoding="utf-8")] + TEXTS
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus])
    model = BPE_DIR if name == "HuggingFaceTokenizer" else SP_MODEL
    theirs = MHF(model, additional_special_tokens=[], use_fast=False) if name == "HuggingFaceTokenizer" else MSP(model)
    _megatron_reference(str(tmp_path / "ref"), theirs, corpus, np.uint16)
    tok = build_tokenizer(name, model)
    summary = preprocess([str(src)], str(tmp_path / "ours"), tok, append_eod=True, workers=2, block_bytes=2048,
                         log_stream=open(os.devnull, "w"))
    for ext in ("bin", "idx"):
        assert filecmp.cmp(f"{summary.outputs['text']}.{ext}", tmp_path / f"ref.{ext}", shallow=False)


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")


@pytest.mark.skipif(not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR (and MEGATRON_LM_EXTRA_PYTHONPATH for six, "
                                                "triton) to compare with Megatron-LM's own script")
@pytest.mark.parametrize("tok_args", [
    ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", BPE_DIR],
    ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL],
    ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{BPE_DIR}/vocab.json", "--merge-file",
     f"{BPE_DIR}/merges.txt", "--legacy-tokenizer"],
], ids=["hf", "sp", "gpt2"])
def test_bytes_match_megatron_lm_script(tmp_path, tok_args):
    """Byte-for-byte the .bin/.idx Megatron-LM's tools/preprocess_data.py writes for the same input."""
    corpus = [json.loads(line)["text"] for line in open(ASSETS / "corpus.jsonl", encoding="utf-8")] + TEXTS
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus])
    common = ["--input", str(src), "--workers", "2", "--append-eod", *tok_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (MEGATRON_LM_DIR, os.environ.get("MEGATRON_LM_EXTRA_PYTHONPATH")) if p)}
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--output-prefix", str(tmp_path / "mlm"), *common],
                   cwd=MEGATRON_LM_DIR, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--output-prefix",
                    str(tmp_path / "ours"), *common], check=True, capture_output=True)
    for ext in ("bin", "idx"):
        assert filecmp.cmp(tmp_path / f"mlm_text_document.{ext}", tmp_path / f"ours_text_document.{ext}", shallow=False)


def test_cli_inputs_keys_and_sentences(tmp_path):
    """The CLI (2 workers) takes a glob of .jsonl/.jsonl.gz, several --json-keys (one output each) and a
    list of strings as sentences (one sequence each, empty ones dropped, EOD on the last)."""
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "ab", "title": "T1"}, {"text": ["cd", "", "e"], "title": "T2"}])
    _write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "f", "title": ""}], opener=gzip.open)
    out = tmp_path / "out" / "ds"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
                           str(tmp_path / "*.json*"), "--output-prefix", str(out), "--json-keys", "text", "title",
                           "--tokenizer-type", "ByteTokenizer", "--append-eod", "--workers", "2",
                           "--log-interval", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "docs/s" in proc.stderr and "MB/s" in proc.stderr and "ETA" in proc.stderr and "documents: 3" in proc.stderr
    text = validate_indexed(f"{out}_text_document")
    assert text.sequence_lengths.tolist() == [3, 2, 2, 2] and text.document_indices.tolist() == [0, 1, 3, 4]
    assert [d.tolist() for d in _documents(f"{out}_text_document")] == [[97, 98, 256], [99, 100, 101, 256], [102, 256]]
    title = _documents(f"{out}_title_document")
    assert [d.tolist() for d in title] == [[84, 49, 256], [84, 50, 256], []]


def test_text_folder_parquet_and_arrow(tmp_path):
    """A folder of .txt files (one document each), Parquet and a datasets.save_to_disk folder give the
    same documents as the equivalent JSONL."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = ["first doc\nline two", "second", "thïrd"]
    tok = build_tokenizer("ByteTokenizer")
    quiet = open(os.devnull, "w")
    ref = preprocess([str(_write_jsonl(tmp_path / "ref.jsonl", [{"text": t} for t in texts]))], str(tmp_path / "ref"),
                     tok, append_eod=True, log_stream=quiet)
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    table = pa.table({"text": texts, "id": [1, 2, 3]})
    pq.write_table(table.slice(0, 2), tmp_path / "p0.parquet")
    pq.write_table(table.slice(2), tmp_path / "p1.parquet")
    hf = tmp_path / "hf"
    hf.mkdir()
    with pa.ipc.new_stream(str(hf / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for name, inputs in [("txt", [str(tmp_path / "txt")]), ("pq", [str(tmp_path / "p*.parquet")]),
                         ("arrow", [str(hf)])]:
        s = preprocess(inputs, str(tmp_path / name), tok, append_eod=True, log_stream=quiet)
        for ext in ("bin", "idx"):
            assert filecmp.cmp(f"{s.outputs['text']}.{ext}", f"{ref.outputs['text']}.{ext}", shallow=False), name


def test_vocab_size_picks_dtype(tmp_path):
    """uint16 below 65500 ids, int32 from there (NullTokenizer --vocab-size 70000 -> 70001 ids)."""
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "1 69999 5"}])
    s = preprocess([str(src)], str(tmp_path / "big"), build_tokenizer("NullTokenizer", vocab_size=70000),
                   append_eod=True, log_stream=open(os.devnull, "w"))
    info = validate_indexed(s.outputs["text"])
    assert info.dtype == np.int32 and _documents(s.outputs["text"])[0].tolist() == [1, 69999, 5, 70000]


BAD_LINES = [
    ("not json", b'{"text": "ok"}\n{"text": "broken\n', 2, "not valid JSON"),
    ("missing key", b'{"text": "ok"}\n{"body": "x"}\n', 2, "no key 'text'"),
    ("bad utf-8", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n', 3, "not valid UTF-8"),
    ("not a string", b'{"text": 5}\n', 1, "not a string"),
    ("out of vocabulary", b'{"text": "1 2"}\n{"text": "3 5000"}\n', 2, "outside the vocabulary"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case,data,line,message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_input_stops_with_location_and_leaves_nothing(tmp_path, case, data, line, message, workers):
    """A bad record stops the run with 'file:line: reason' and no output (not even temporary files)."""
    src = tmp_path / "in" / "data.jsonl"
    src.parent.mkdir()
    src.write_bytes(data)
    out = tmp_path / "out"
    tok = build_tokenizer("NullTokenizer", vocab_size=100) if case == "out of vocabulary" else \
        build_tokenizer("ByteTokenizer")
    with pytest.raises(PreprocessError) as err:
        preprocess([str(src)], str(out / "ds"), tok, append_eod=True, workers=workers, block_bytes=16,
                   log_stream=open(os.devnull, "w"))
    assert f"{src}:{line}:" in str(err.value) and message in str(err.value)
    assert not out.exists() or os.listdir(out) == []


def test_cli_bad_input_exit_code_and_skip_invalid(tmp_path):
    """The CLI exits non-zero naming file:line; --skip-invalid instead skips and reports the count."""
    src = tmp_path / "data.jsonl"
    src.write_bytes(b'{"text": "a"}\nnot json\n{"other": 1}\n{"text": "\xff"}\n{"text": "b"}\n')
    base = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src), "--output-prefix",
            str(tmp_path / "out" / "ds"), "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 1 and f"{src}:2: not valid JSON" in proc.stderr
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    proc = subprocess.run(base + ["--skip-invalid"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped:   3 invalid record(s)" in proc.stderr
    assert [d.tolist() for d in _documents(str(tmp_path / "out" / "ds_text_document"))] == [[97, 256], [98, 256]]


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_input_is_an_error(tmp_path, content):
    """An input with no documents is an error, and writes nothing."""
    src = tmp_path / "empty.jsonl"
    src.write_bytes(content)
    with pytest.raises(PreprocessError, match="no documents"):
        preprocess([str(src)], str(tmp_path / "out" / "ds"), build_tokenizer("ByteTokenizer"),
                   log_stream=open(os.devnull, "w"))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    with pytest.raises(PreprocessError, match="no input files match"):
        preprocess([str(tmp_path / "nothing*.jsonl")], str(tmp_path / "out" / "ds"), build_tokenizer("ByteTokenizer"))


def test_writer_publishes_bin_before_idx_and_never_pairs_old_idx(tmp_path, monkeypatch):
    """The writer renames .bin then .idx; an old .idx is removed before the new .bin lands, so a run
    killed between the renames leaves no pair that looks complete."""
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, vocab_size=300) as w:
        w.add_document([1, 2, 3])
    assert validate_indexed(prefix).num_tokens == 3
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append(Path(dst).suffix)
        if dst.endswith(".idx"):
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    w = IndexedDatasetWriter(prefix, vocab_size=300)
    w.add_document([4, 5])
    with pytest.raises(KeyboardInterrupt):
        w.finalize()
    assert renames == [".bin", ".idx"]
    assert os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")


def test_writer_abort_leaves_nothing(tmp_path):
    """An exception inside the writer's `with` removes its temporary files; nothing is published."""
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "ds"), vocab_size=300) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
