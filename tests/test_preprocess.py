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


@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 1), (1, 3)], ids=["w1", "w2", "w1-p3"])
@pytest.mark.parametrize("case,data,line,message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_input_stops_with_location_and_leaves_nothing(tmp_path, case, data, line, message, workers, partitions):
    """A bad record stops the run with 'file:line: reason' and no output (not even temporary files); with
    partitions the line is still the file's own line number, wherever the partition starts."""
    src = tmp_path / "in" / "data.jsonl"
    src.parent.mkdir()
    src.write_bytes(data)
    out = tmp_path / "out"
    tok = build_tokenizer("NullTokenizer", vocab_size=100) if case == "out of vocabulary" else \
        build_tokenizer("ByteTokenizer")
    with pytest.raises(PreprocessError) as err:
        preprocess([str(src)], str(out / "ds"), tok, append_eod=True, workers=workers, block_bytes=16,
                   partitions=partitions, log_stream=open(os.devnull, "w"))
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


# --------------------------------------------------------------------------------------------------
# --split-sentences / --keep-newlines
# --------------------------------------------------------------------------------------------------
SENTENCE_TEXTS = ["Hello world. This is Dr. Smith speaking! A new line here.\nAnd a paragraph? Yes.", "",
                  "No punctuation at all", "End.\n\nNext para.\n  Third one. ", "  Lead. Two.", "naïve 東京. Ünïcode ok.",
                  " ", "x" * 300 + ". " + "Y" * 40 + "."]


def _megatron_sentence_reference(prefix: str, tok, texts, splitter):
    """Megatron-LM's --split-sentences (Encoder.split, then Encoder.encode with --append-eod), written
    with megatron-core's own IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        sentences = [s for i in range(0, len(text), 1000000) for s in splitter.tokenize(text[i:i + 1000000])]
        ids, lens = [], []
        for sentence in sentences:
            sentence_ids = tok.tokenize(sentence)
            if sentence_ids:
                ids += sentence_ids
                lens.append(len(sentence_ids))
        if ids:
            ids.append(tok.eod)
            lens[-1] += 1
        builder.add_document(ids, lens)
    builder.finalize(prefix + ".idx")


def _same_dataset(a: str, b: str) -> bool:
    return all(filecmp.cmp(f"{a}.{ext}", f"{b}.{ext}", shallow=False) for ext in ("bin", "idx"))


@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 1), (2, 2)])
def test_split_sentences_one_sequence_per_sentence(tmp_path, workers, partitions):
    """--split-sentences writes {prefix}_text_sentence: read with megatron-core's IndexedDataset, one
    sequence per non-empty sentence, document_indices at each document's end, EOD on its last sentence;
    the bytes Megatron-LM's encode step gives for the same splitter (here punkt with no model)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    punkt = pytest.importorskip("nltk.tokenize.punkt")
    tok = build_tokenizer("ByteTokenizer")
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCE_TEXTS])
    s = preprocess([str(src)], str(tmp_path / "out"), tok, append_eod=True, split_sentences=True,
                   sentence_splitter="punkt-untrained", workers=workers, partitions=partitions, block_bytes=64,
                   log_stream=open(os.devnull, "w"))
    prefix = s.outputs["text"]
    assert prefix == f"{tmp_path / 'out'}_text_sentence"
    assert not os.path.exists(f"{tmp_path / 'out'}_text_document.bin")
    splitter = punkt.PunktSentenceTokenizer()
    sentences = [[x for x in splitter.tokenize(t) if tok.tokenize(x)] for t in SENTENCE_TEXTS]
    assert len(sentences[0]) >= 4  # the first document really is split
    ds = IndexedDataset(prefix)
    assert len(ds) == sum(map(len, sentences)) == s.sequences and s.documents == len(SENTENCE_TEXTS)
    assert ds.document_indices.tolist() == np.cumsum([0] + [len(x) for x in sentences]).tolist()
    seq = 0
    for doc in sentences:
        for j, sentence in enumerate(doc):
            assert ds[seq].tolist() == tok.tokenize(sentence) + ([tok.eod] if j == len(doc) - 1 else [])
            seq += 1
    _megatron_sentence_reference(str(tmp_path / "ref"), tok, SENTENCE_TEXTS, splitter)
    assert _same_dataset(prefix, str(tmp_path / "ref"))


def test_keep_newlines_matches_megatron_custom_language_vars(tmp_path):
    """--keep-newlines keeps the whitespace after each sentence (newlines too) in that sentence, as
    Megatron-LM's CustomLanguageVars does: same bytes as a splitter built with Megatron-LM's class."""
    punkt = pytest.importorskip("nltk.tokenize.punkt")

    class CustomLanguageVars(punkt.PunktLanguageVars):  # verbatim from Megatron-LM tools/preprocess_data.py
        _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""

    splitter = punkt.PunktSentenceTokenizer(train_text=punkt.PunktSentenceTokenizer()._params,
                                            lang_vars=CustomLanguageVars())
    tok = build_tokenizer("ByteTokenizer")
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCE_TEXTS])
    s = preprocess([str(src)], str(tmp_path / "out"), tok, append_eod=True, split_sentences=True, keep_newlines=True,
                   sentence_splitter="punkt-untrained", workers=2, log_stream=open(os.devnull, "w"))
    _megatron_sentence_reference(str(tmp_path / "ref"), tok, SENTENCE_TEXTS, splitter)
    assert _same_dataset(s.outputs["text"], str(tmp_path / "ref"))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(s.outputs["text"])
    decoded = [tok.detokenize([t for t in ds[i].tolist() if t != tok.eod]) for i in range(len(ds))]
    assert "End.\n\n" in decoded and "A new line here.\n" in decoded


def _fake_punkt_model(root: Path, lang: str = "english", abbreviations=("dr",)) -> Path:
    """A tiny punkt_tab model (the layout `python -m nltk.downloader punkt_tab` installs) knowing a few
    abbreviations: tests need no download."""
    d = root / "tokenizers" / "punkt_tab" / lang
    d.mkdir(parents=True)
    (d / "abbrev_types.txt").write_text("".join(a + "\n" for a in abbreviations))
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (d / name).write_text("")
    return root


def test_punkt_model_from_nltk_data_and_missing_model(tmp_path, monkeypatch):
    """The default splitter is NLTK's punkt model (found on nltk.data.path, here a stand-in knowing 'Dr.'),
    in the workers too; with no model the run stops, saying what to install, and writes nothing."""
    nltk = pytest.importorskip("nltk")
    if not hasattr(pytest.importorskip("nltk.tokenize.punkt"), "PunktTokenizer"):
        pytest.skip("NLTK < 3.8.2 reads pickled punkt models")
    tok = build_tokenizer("ByteTokenizer")
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "This is Dr. Smith. He left."},
                                               {"text": "Dr. Who came.\nThen he went."}])
    quiet = open(os.devnull, "w")
    monkeypatch.setattr(nltk.data, "path", [str(_fake_punkt_model(tmp_path / "nltk_data"))])
    for keep_newlines, want in [(False, [["This is Dr. Smith.", "He left."], ["Dr. Who came.", "Then he went."]]),
                                (True, [["This is Dr. Smith. ", "He left."], ["Dr. Who came.\n", "Then he went."]])]:
        s = preprocess([str(src)], str(tmp_path / f"out{keep_newlines}"), tok, split_sentences=True,
                       keep_newlines=keep_newlines, workers=2, log_stream=quiet)
        info = validate_indexed(s.outputs["text"])
        assert info.document_indices.tolist() == [0, 2, 4]
        assert info.sequence_lengths.tolist() == [len(x.encode()) for doc in want for x in doc]
    out = tmp_path / "missing"
    for path, lang in [([str(tmp_path / "empty")], "english"), ([str(tmp_path / "nltk_data")], "german")]:
        monkeypatch.setattr(nltk.data, "path", path)
        with pytest.raises(PreprocessError, match="punkt_tab") as err:
            preprocess([str(src)], str(out / "ds"), tok, split_sentences=True, lang=lang, log_stream=quiet)
        assert "python -m nltk.downloader punkt_tab" in str(err.value) and "punkt-untrained" in str(err.value)
    assert not out.exists() or os.listdir(out) == []


def test_split_sentences_without_nltk_says_what_to_install(tmp_path, monkeypatch):
    """With nltk not installed, --split-sentences (either splitter) stops before reading any input,
    naming the package (and for punkt the data) to install."""
    for name in [m for m in sys.modules if m == "nltk" or m.startswith("nltk.")] + ["nltk", "nltk.tokenize.punkt"]:
        monkeypatch.setitem(sys.modules, name, None)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "One. Two."}])
    for kind, data in [("punkt", True), ("punkt-untrained", False)]:
        with pytest.raises(PreprocessError, match="pip install nltk") as err:
            preprocess([str(src)], str(tmp_path / "out" / "ds"), build_tokenizer("ByteTokenizer"), split_sentences=True,
                       sentence_splitter=kind)
        assert ("nltk.downloader punkt_tab" in str(err.value)) == data
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------------
# --partitions
# --------------------------------------------------------------------------------------------------
def _partition_corpus(tmp_path: Path, bad_line: bool = False) -> tuple[list[str], int]:
    """Three inputs (a long .jsonl with blank lines and a list value, a .jsonl.gz, a small .jsonl), and the
    line of a.jsonl that is not JSON when `bad_line`."""
    lines, bad = [], 0
    for i in range(400):
        lines.append(json.dumps({"text": f"document {i} " * (i % 9), "title": f"t{i}"}))
        if i % 37 == 0:
            lines.append("")
        if i == 41:
            lines.append(json.dumps({"text": ["sentence one", "", "two"], "title": "list"}))
        if bad_line and i == 300:
            lines.append('{"text": broken')
            bad = len(lines)
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_jsonl(tmp_path / "b.jsonl.gz", [{"text": f"gz {i} ü", "title": ""} for i in range(50)], opener=gzip.open)
    _write_jsonl(tmp_path / "c.jsonl", [{"text": "last", "title": "c"}])
    return [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl")], bad


@pytest.mark.parametrize("partitions,workers", [(2, 1), (3, 2), (8, 3)])
def test_partitions_same_bytes_as_one(tmp_path, partitions, workers):
    """--partitions N gives byte for byte the .bin/.idx of --partitions 1, for every key, with the work
    spread over N processes; skipped records are reported with their real line; no partial files remain."""
    import io

    inputs, bad = _partition_corpus(tmp_path, bad_line=True)
    tok = build_tokenizer("ByteTokenizer")
    out = tmp_path / "out"
    kw = dict(json_keys=["text", "title"], append_eod=True, skip_invalid=True, block_bytes=512)
    ref = preprocess(inputs, str(out / "ref"), tok, log_stream=open(os.devnull, "w"), **kw)
    log = io.StringIO()
    got = preprocess(inputs, str(out / "got"), tok, partitions=partitions, workers=workers, log_stream=log, **kw)
    assert got.partitions == partitions and ref.partitions == 1
    for key in ("text", "title"):
        assert _same_dataset(got.outputs[key], ref.outputs[key])
    assert (got.documents, got.sequences, got.tokens, got.empty_documents, got.invalid_skipped, got.blank_lines) == \
        (ref.documents, ref.sequences, ref.tokens, ref.empty_documents, 1, ref.blank_lines)
    assert f"skipping invalid record: {inputs[0]}:{bad}: not valid JSON" in log.getvalue()
    assert sorted(os.listdir(out)) == sorted(f"{n}_{k}_document.{e}" for n in ("ref", "got") for k in ("text", "title")
                                             for e in ("bin", "idx"))


def test_partition_inputs_cut_between_lines(tmp_path):
    """Partitions are contiguous, in input order: a plain .jsonl is cut only at line starts and its pieces
    cover it exactly; a .gz file goes whole to one partition."""
    from megatron_dataeff.data.preprocess import partition_inputs

    inputs, _ = _partition_corpus(tmp_path)
    parts = partition_inputs([(p, "jsonl") for p in inputs], 5)
    assert 2 <= len(parts) <= 5
    pieces = [p for part in parts for p in part]
    assert [p.path for p in pieces] == sorted([p.path for p in pieces], key=inputs.index)
    data = Path(inputs[0]).read_bytes()
    ranges = [(p.start, p.end) for p in pieces if p.path == inputs[0]]
    assert len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert all(end == nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:]))
    assert all(data[start - 1:start] == b"\n" for start, _ in ranges[1:])
    assert [(p.start, p.end) for p in pieces if p.path == inputs[1]] == [(0, None)]


def test_partition_that_dies_leaves_nothing(tmp_path, monkeypatch):
    """A partition process that dies (killed, out of memory) stops the run with an error naming it; the
    other partitions are stopped and no partial or temporary file is left."""
    import megatron_dataeff.data.partitions as partitions

    real = partitions.run_partition

    def dying(index, spec, pieces, prefixes, *args):
        if index == 1:
            for prefix in prefixes.values():
                Path(prefix + ".bin").write_bytes(b"partial")
            os._exit(3)
        real(index, spec, pieces, prefixes, *args)

    monkeypatch.setattr(partitions, "run_partition", dying)
    inputs, _ = _partition_corpus(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match="partition 1 .* exit code 3"):
        preprocess(inputs, str(out / "ds"), build_tokenizer("ByteTokenizer"), partitions=3,
                   log_stream=open(os.devnull, "w"))
    assert not out.exists() or os.listdir(out) == []


def test_cli_split_sentences_partitions(tmp_path):
    """The CLI: --split-sentences --sentence-splitter punkt-untrained --keep-newlines --partitions 2
    --workers 2 writes {prefix}_text_sentence, the same bytes as the in-process run with one partition."""
    pytest.importorskip("nltk")
    inputs, _ = _partition_corpus(tmp_path)
    out = tmp_path / "out" / "ds"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", *inputs,
                           "--output-prefix", str(out), "--tokenizer-type", "ByteTokenizer", "--append-eod",
                           "--split-sentences", "--sentence-splitter", "punkt-untrained", "--keep-newlines",
                           "--partitions", "2", "--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 partitions" in proc.stderr
    ref = preprocess(inputs, str(tmp_path / "ref"), build_tokenizer("ByteTokenizer"), append_eod=True,
                     split_sentences=True, keep_newlines=True, sentence_splitter="punkt-untrained",
                     log_stream=open(os.devnull, "w"))
    assert _same_dataset(f"{out}_text_sentence", ref.outputs["text"])
    assert sorted(os.listdir(out.parent)) == ["ds_text_sentence.bin", "ds_text_sentence.idx"]


def test_summary_counts_are_summed_by_name():
    """The counts a partition sends are the summary's count fields, added up by name; the run's other
    fields (files, bytes, partitions) are not counts, and a missing count is an error, not a zero."""
    from megatron_dataeff.data.preprocess_summary import COUNT_FIELDS, PreprocessSummary

    assert {"documents", "tokens", "invalid_skipped", "blank_lines"} <= set(COUNT_FIELDS)
    assert not {"outputs", "input_bytes", "seconds", "files", "dtype", "partitions"} & set(COUNT_FIELDS)
    part = PreprocessSummary({}, files=3, input_bytes=10, **{name: i + 1 for i, name in enumerate(COUNT_FIELDS)})
    total = PreprocessSummary({}, files=3, input_bytes=10)
    total.add_counts(part.counts())
    total.add_counts(part.counts())
    assert total.counts() == {name: 2 * (i + 1) for i, name in enumerate(COUNT_FIELDS)}
    assert (total.files, total.input_bytes, total.partitions) == (3, 10, 1)
    with pytest.raises(KeyError):
        total.add_counts({name: 1 for name in COUNT_FIELDS[1:]})
