"""A checkpoint's tokenizer in Hugging Face form encodes real text to the ids training used.

SentencePiece: Megatron-LM's SentencePieceTokenizer is `encode_as_ids(text)` (no BOS/EOS); the export is a
fast tokenizer built from the `.model` file, compared id for id on the test corpus (and awkward strings)
for Unigram and BPE models, with identity and NFKC normalization, after a save / `AutoTokenizer` reload.
"""

from pathlib import Path

import pytest

from megatron_dataeff.data.tokenizer_training import iter_training_texts, train_sentencepiece
from megatron_dataeff.data.tokenizers import build_tokenizer
from megatron_dataeff.export.hf_tokenizer import save_hf_tokenizer

ASSETS = Path(__file__).parent / "assets"
AWKWARD = ["Hello, world!", "", " leading and trailing  ", "naïve 東京 😀 ß\n\n\ttab", "ﬁ ① Ｈｅｌｌｏ",
           "<|endoftext|> in text", "don't 3.14 2024", "x" * 300, "ΑΒΓ αβγ", "\u200b zero width", "  two",
           "▁x ▁ y", "line\r\nbreak", "the the the", "[MASK] and </s> as text"]


@pytest.fixture(scope="module")
def corpus():
    return list(iter_training_texts([str(ASSETS / "corpus.jsonl")]))


def _models(corpus, root):
    yield "asset-bpe-identity", str(ASSETS / "tokenizers" / "sp.model")
    for model_type in ("unigram", "bpe"):
        for rule in ("identity", "nmt_nfkc"):
            # (The run of x's is left out: it trains pieces of x's whose segmentations tie, which the two
            # libraries break differently.)
            text = corpus + [t for t in AWKWARD if "xxx" not in t]
            yield (f"{model_type}-{rule}", train_sentencepiece(text, str(root / f"{model_type}_{rule}"), vocab_size=600,
                                                               model_type=model_type, normalization_rule_name=rule))


def test_sentencepiece_export_encodes_as_training_did(corpus, tmp_path):
    """Every SentencePiece model type and normalization: the HF export gives the ids Megatron-LM's
    SentencePieceTokenizer (ours) gives, with no BOS/EOS added, decodes alike, and keeps EOD and [MASK]."""
    from transformers import AutoTokenizer

    for name, model in _models(corpus, tmp_path):
        ours = build_tokenizer("SentencePieceTokenizer", model)
        assert save_hf_tokenizer(ours.metadata(), str(tmp_path / name)), name
        hf = AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert hf.eos_token_id == ours.eod and hf.mask_token_id == ours.mask_token_id is not None, name
        for text in AWKWARD + corpus:
            if name.startswith("unigram") and "[MASK]" in text:
                continue  # '[' is outside these vocabularies: the limit in sentencepiece_tokenizer_hf's docstring
            ids = ours.tokenize(text)
            assert hf(text).input_ids == ids, (name, text)
            assert hf.decode(ids) == ours.detokenize(ids), (name, text)
        batch = AWKWARD[:4] + corpus[:20]
        assert hf(batch).input_ids == ours.tokenize_batch(batch), name


def test_sentencepiece_models_without_hf_form_are_refused(corpus, tmp_path):
    """A SentencePiece word model cannot be reproduced by HF tokenizers: refused, naming the file."""
    from megatron_dataeff.errors import ConfigError

    model = train_sentencepiece(corpus[:50], str(tmp_path / "word"), vocab_size=300, model_type="word")
    ours = build_tokenizer("SentencePieceTokenizer", model)
    with pytest.raises(ConfigError, match="word.model.*word model"):
        save_hf_tokenizer(ours.metadata(), str(tmp_path / "hf"))
