"""Tokenizers: fixed ByteTokenizer ids, Megatron-LM-compatible ids/EOD, batch paths, training, metadata."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from megatron_dataeff.data.tokenizer_training import iter_training_texts, train_byte_level_bpe, train_sentencepiece
from megatron_dataeff.data.tokenizers import (ByteTokenizer, NullTokenizer, build_tokenizer, resolve_mask_token,
                                              tokenizer_from_metadata)

ASSETS = Path(__file__).parent / "assets"
BPE_DIR = str(ASSETS / "tokenizers" / "bpe")
SP_MODEL = str(ASSETS / "tokenizers" / "sp.model")
TRICKY = ["Hello, world!", "", " leading and trailing  ", "naïve 東京 😀 ß\n\n\ttab", "<|endoftext|> in text",
          "a [MASK] b", "don't 3.14 2024", "x" * 300, "ΑΒΓ αβγ", "\u200b zero width"]


def _all(name: str):
    if name == "hf":
        return build_tokenizer("HuggingFaceTokenizer", BPE_DIR)
    if name == "sp":
        return build_tokenizer("SentencePieceTokenizer", SP_MODEL)
    if name == "gpt2":
        return build_tokenizer("GPT2BPETokenizer", vocab_file=f"{BPE_DIR}/vocab.json", merge_file=f"{BPE_DIR}/merges.txt")
    if name == "null":
        return build_tokenizer("NullTokenizer", vocab_size=1000)
    return build_tokenizer("ByteTokenizer")


def test_byte_tokenizer_ids_are_fixed():
    """The trainer depends on ByteTokenizer's ids: bytes 0-255, EOD 256, [MASK] 257, 258 ids."""
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod, tok.mask_token_id) == (258, 256, 257)
    assert tok.tokenize("aé") == [97, 0xC3, 0xA9]
    assert resolve_mask_token(tok) == (257, 258)
    for text in TRICKY:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_null_tokenizer_matches_megatron():
    """NullTokenizer: --vocab-size V gives EOD = V and V + 1 ids, as megatron-core's NullTokenizer(V) up to
    0.17; from 0.18 megatron's NullTokenizer(V) has V ids with EOD = V - 1, so ours(V) is theirs(V + 1)."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as MegatronNull
    from packaging.version import Version

    from megatron_dataeff.checkpoint.format import megatron_core_version

    since_018 = Version(megatron_core_version()).release >= (0, 18)
    ours, theirs = NullTokenizer(1000), MegatronNull(1001 if since_018 else 1000)
    assert (ours.vocab_size, ours.eod) == (theirs.vocab_size, theirs.eod) == (1001, 1000)
    assert ours.tokenize("3 1 4 15") == theirs.text_to_ids("3 1 4 15") == [3, 1, 4, 15]
    assert resolve_mask_token(ours) == (1001, 1002)
    with pytest.raises(ValueError):
        NullTokenizer(None)


@pytest.mark.parametrize("name", ["byte", "hf", "sp", "gpt2", "null"])
def test_batch_path_matches_single(name):
    """tokenize_batch / tokenize_batch_flat give exactly the ids of tokenize, text by text."""
    tok = _all(name)
    texts = ["1 2 3", "", "42 7"] if name == "null" else TRICKY
    singles = [tok.tokenize(t) for t in texts]
    assert tok.tokenize_batch(texts) == singles
    flat, lengths = tok.tokenize_batch_flat(texts)
    assert lengths.tolist() == [len(s) for s in singles]
    assert flat.tolist() == [i for s in singles for i in s]


@pytest.mark.parametrize("name", ["byte", "hf", "sp", "gpt2", "null"])
def test_metadata_rebuilds_the_tokenizer(name):
    """metadata() is JSON and rebuilds a tokenizer with the same ids, EOD, mask and vocabulary."""
    tok = _all(name)
    meta = json.loads(json.dumps(tok.metadata()))
    again = tokenizer_from_metadata(meta)
    assert type(again) is type(tok)
    assert (again.vocab_size, again.eod, again.mask_token_id) == (tok.vocab_size, tok.eod, tok.mask_token_id)
    text = "7 8 9" if name == "null" else TRICKY[3]
    assert again.tokenize(text) == tok.tokenize(text)


def test_hf_tokenizer_matches_megatron_core():
    """HuggingFaceTokenizer ids, EOD and vocab size equal megatron-core's HF wrapper with Megatron-LM's
    preprocess defaults (no BOS/EOS added; special tokens in text recognised)."""
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer as MegatronHF

    ours = _all("hf")
    theirs = MegatronHF(BPE_DIR, additional_special_tokens=[], use_fast=False, include_special_tokens=False)
    assert ours.vocab_size == theirs.vocab_size
    assert ours.eod == theirs.eod == 0
    assert ours.mask_token_id == 1
    for text in TRICKY:
        assert ours.tokenize(text) == theirs.text_to_ids(text), text
    assert ours.tokenize_batch(TRICKY) == [theirs.text_to_ids(t) for t in TRICKY]
    assert ours.tokenize("<|endoftext|>") == [ours.eod]


def test_sentencepiece_matches_megatron_core():
    """SentencePieceTokenizer ids, EOD (the model's eos) and vocab size equal megatron-core's wrapper."""
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer as MegatronSP

    ours, theirs = _all("sp"), MegatronSP(SP_MODEL)
    assert ours.vocab_size == theirs.vocab_size
    assert ours.eod == theirs.eos_id == 2
    assert ours.mask_token_id == 4 and ours.tokenize("[MASK]") != [4]  # a control symbol: never from text
    for text in TRICKY:
        assert ours.tokenize(text) == theirs.text_to_ids(text), text


def test_gpt2_bpe_is_byte_level_and_lossless():
    """GPT2BPETokenizer: lossless, and <|endoftext|> in text is plain text (OpenAI/Megatron legacy)."""
    tok = _all("gpt2")
    assert tok.eod == json.load(open(f"{BPE_DIR}/vocab.json"))["<|endoftext|>"]
    assert tok.eod not in tok.tokenize("<|endoftext|>")
    for text in TRICKY:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.mask_token_id is None and resolve_mask_token(tok) == (tok.vocab_size, tok.vocab_size + 1)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"), reason="set MEGATRON_LM_DIR to a Megatron-LM checkout")
def test_gpt2_bpe_matches_megatron_lm_legacy():
    """GPT2BPETokenizer ids equal Megatron-LM's own GPT2Tokenizer (gpt2_tokenization.py) on the same files."""
    path = Path(os.environ["MEGATRON_LM_DIR"]) / "megatron" / "training" / "tokenizer" / "gpt2_tokenization.py"
    spec = importlib.util.spec_from_file_location("_mlm_gpt2_tokenization", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    theirs = module.GPT2Tokenizer(f"{BPE_DIR}/vocab.json", f"{BPE_DIR}/merges.txt", errors="replace",
                                  special_tokens=[], max_len=None)
    ours = _all("gpt2")
    corpus = list(iter_training_texts([str(ASSETS / "corpus.jsonl")]))
    for text in TRICKY + corpus[:50]:
        assert ours.tokenize(text) == theirs.encode(text), text


def test_byte_level_bpe_round_trip_and_hf_loading(tmp_path):
    """A freshly trained byte-level BPE loads as HuggingFaceTokenizer with [MASK] found, EOD = <|endoftext|>,
    and its vocab.json/merges.txt load as a GPT2BPETokenizer with the same ids on ordinary text."""
    texts = list(iter_training_texts([str(ASSETS / "corpus.jsonl")]))
    out = train_byte_level_bpe(texts, str(tmp_path / "bpe"), vocab_size=350)
    hf = build_tokenizer("HuggingFaceTokenizer", out)
    assert hf.mask_token_id == 1 and hf.eod == 0 and hf.vocab_size <= 350
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=f"{out}/vocab.json", merge_file=f"{out}/merges.txt")
    for text in TRICKY + texts[:20]:
        assert hf.detokenize(hf.tokenize(text)) == text.replace("<|endoftext|>", "").replace("[MASK]", "")
        if "<|" not in text and "[MASK]" not in text:
            assert gpt2.tokenize(text) == hf.tokenize(text)
    # tokenizer.json alone also loads.
    assert build_tokenizer("HuggingFaceTokenizer", f"{out}/tokenizer.json").tokenize("the data") == hf.tokenize("the data")


def test_sentencepiece_training_has_mask_and_eod(tmp_path):
    """A trained SentencePiece model has EOD = eos (2) and a [MASK] control symbol the trainer finds."""
    texts = list(iter_training_texts([str(ASSETS / "corpus.jsonl")]))
    model = train_sentencepiece(texts, str(tmp_path / "sp"), vocab_size=380, model_type="unigram")
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert tok.eod == 2 and tok.mask_token_id is not None
    assert resolve_mask_token(tok) == (tok.mask_token_id, tok.vocab_size)
    assert tok.detokenize(tok.tokenize("naïve  東京 data")) == "naïve  東京 data"


def test_build_tokenizer_errors(tmp_path):
    """Unknown types and missing files fail with a message naming what is missing."""
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("BertWordPieceCase")
    with pytest.raises(FileNotFoundError, match="tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=f"{BPE_DIR}/vocab.json")
