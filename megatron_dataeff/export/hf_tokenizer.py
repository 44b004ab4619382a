"""Hugging Face form of a checkpoint's tokenizer (written next to an exported model).

* HuggingFaceTokenizer: the tokenizer itself, re-saved with `save_pretrained` (not a copy of its
  directory, which after `tools/import_hf.py` is a whole model directory).
* ByteTokenizer: an exact HF equivalent -- a byte-level `tokenizers` model whose id for byte b is b,
  then <|endoftext|> = 256 and [MASK] = 257 -- so `AutoTokenizer.from_pretrained(export)` encodes
  and decodes as our ByteTokenizer does.
* GPT2BPETokenizer: the same byte-level BPE (vocab.json / merges.txt) as a transformers fast
  tokenizer; the one difference is that HF treats "<|endoftext|>" written in text as the EOS token.
* SentencePieceTokenizer: a fast tokenizer built from the `.model` file's own settings
  (`sentencepiece_tokenizer_hf`): the normalizer spec (precompiled charsmap, extra-whitespace removal,
  dummy prefix, whitespace escaping), the Unigram or BPE model with its byte fallback, and no BOS/EOS
  added, as Megatron-LM's SentencePieceTokenizer encodes (`encode_as_ids`).  Control symbols (<s>, </s>,
  [MASK]) written in text are plain text there, so the export sets `split_special_tokens`.
* NullTokenizer (ids written as numbers): no HF form; the export's config.json records that under
  `megatron_dataeff.tokenizer.hf_tokenizer = false` with the tokenizer's metadata, and the exporter
  prints one line saying so.
"""

from __future__ import annotations

from megatron_dataeff.errors import ConfigError


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (what `tokenizers`' ByteLevel uses)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer_hf():
    """A transformers fast tokenizer equivalent to megatron_dataeff's ByteTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "[MASK]"])  # ids 256, 257
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", mask_token="[MASK]",
                                   pad_token="<|endoftext|>")


def _arg(tokenizer_meta: dict, name: str):
    return (tokenizer_meta.get("build_args") or {}).get(name, tokenizer_meta.get(name))


def gpt2_tokenizer_hf(vocab_file: str, merge_file: str):
    """A transformers fast tokenizer running the same byte-level BPE as our GPT2BPETokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# SentencePiece piece types (sentencepiece_model.proto): only NORMAL pieces come from the model's
# segmentation of text; USER_DEFINED pieces are matched in the text whole; CONTROL, UNKNOWN, UNUSED and
# BYTE pieces never match text (bytes come only from the fallback).
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_UNIGRAM, _SP_BPE = 1, 2
_NEVER = -1e9  # the Unigram score of pieces text must not produce (a constant per covered span otherwise)


def sentencepiece_tokenizer_hf(model_file: str, mask_token: str | None = None):
    """A transformers fast tokenizer encoding as `SentencePieceProcessor(model_file).encode(text)` does
    (ids, no BOS/EOS) and decoding as its `decode`; refuses (ConfigError) a model it cannot reproduce.

    One difference is left, for Unigram models only: HF's Unigram cannot exclude a piece from the
    segmentation, so the pieces SentencePiece never matches in text (control symbols such as </s> or
    [MASK], byte pieces such as <0x41>) are given a score no segmentation of ordinary text loses to; the
    literal text of such a piece, when its characters are outside the vocabulary (they would be bytes or
    <unk>), still encodes as that piece here.  BPE models (Llama's, Megatron-LM's) are exact."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ConfigError(f"{model_file}: treat_whitespace_as_suffix has no Hugging Face tokenizers form")
    if proto.denormalizer_spec.precompiled_charsmap:
        raise ConfigError(f"{model_file}: a denormalizer has no Hugging Face tokenizers form")
    pieces = list(proto.pieces)
    unk_id = next((i for i, p in enumerate(pieces) if p.type == _SP_UNKNOWN), None)
    if trainer.model_type == _SP_UNIGRAM:
        vocab = [(p.piece, p.score if p.type in (_SP_NORMAL, _SP_USER_DEFINED) else _NEVER) for p in pieces]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _SP_BPE:
        model = models.BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_sentencepiece_merges(pieces),
                           unk_token=None if unk_id is None else pieces[unk_id].piece, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    else:
        kind = {3: "word", 4: "char"}.get(trainer.model_type, str(trainer.model_type))
        raise ConfigError(f"{model_file}: a SentencePiece {kind} model; only unigram and bpe models export to "
                          "Hugging Face")
    tok = Tokenizer(model)
    # SentencePiece's normalization, in its order: charsmap (e.g. NFKC), extra spaces, dummy prefix, escape.
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    user_defined = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]
    if user_defined:  # matched whole in the normalized text, as SentencePiece's prefix matcher does
        tok.add_tokens([AddedToken(p, normalized=True, special=False) for p in user_defined])
    steps = [decoders.Replace("\u2581", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)

    def piece(index: int) -> str | None:
        return pieces[index].piece if 0 <= index < len(pieces) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=piece(trainer.bos_id), eos_token=piece(trainer.eos_id),
        unk_token=piece(trainer.unk_id), pad_token=piece(trainer.pad_id), mask_token=mask_token,
        split_special_tokens=True, add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)


def _sentencepiece_merges(pieces) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE model: every split of a NORMAL piece into two NORMAL pieces, the
    merges of higher-scoring pieces first (SentencePiece merges the pair whose result scores highest)."""
    score = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
    ranked = sorted((-s, i, piece[:k], piece[k:]) for piece, (s, i) in score.items()
                    for k in range(1, len(piece)) if piece[:k] in score and piece[k:] in score)
    return [(left, right) for _, _, left, right in ranked]


def save_hf_tokenizer(tokenizer_meta: dict, out_dir: str) -> bool:
    """Write the HF form of a checkpoint's tokenizer into out_dir; False when it has none."""
    import os

    ttype = tokenizer_meta.get("tokenizer_type")
    if ttype == "HuggingFaceTokenizer":
        import transformers

        path = _arg(tokenizer_meta, "tokenizer_model")
        if os.path.isfile(path):  # a bare tokenizer.json
            tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            tok = transformers.AutoTokenizer.from_pretrained(path)
        tok.save_pretrained(out_dir)
        return True
    if ttype == "ByteTokenizer":
        byte_tokenizer_hf().save_pretrained(out_dir)
        return True
    if ttype == "SentencePieceTokenizer":
        mask = tokenizer_meta.get("mask_token_id")
        model_file = _arg(tokenizer_meta, "tokenizer_model")
        mask_token = None
        if mask is not None:
            import sentencepiece

            mask_token = sentencepiece.SentencePieceProcessor(model_file=model_file).id_to_piece(int(mask))
        sentencepiece_tokenizer_hf(model_file, mask_token).save_pretrained(out_dir)
        return True
    if ttype == "GPT2BPETokenizer":
        gpt2_tokenizer_hf(_arg(tokenizer_meta, "vocab_file"), _arg(tokenizer_meta, "merge_file")).save_pretrained(out_dir)
        return True
    return False  # NullTokenizer: ids written as numbers, no HF form
