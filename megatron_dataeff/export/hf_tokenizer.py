"""Hugging Face form of a checkpoint's tokenizer (written next to an exported model).

* HuggingFaceTokenizer: the tokenizer itself, re-saved with `save_pretrained` (not a copy of its
  directory, which after `tools/import_hf.py` is a whole model directory).
* ByteTokenizer: an exact HF equivalent -- a byte-level `tokenizers` model whose id for byte b is b,
  then <|endoftext|> = 256 and [MASK] = 257 -- so `AutoTokenizer.from_pretrained(export)` encodes
  and decodes as our ByteTokenizer does.
* GPT2BPETokenizer: the same byte-level BPE (vocab.json / merges.txt) as a transformers fast
  tokenizer; the one difference is that HF treats "<|endoftext|>" written in text as the EOS token.
* NullTokenizer (ids written as numbers) and SentencePieceTokenizer (Megatron-LM encodes with no
  BOS/EOS, which no stock HF class reproduces): no HF form; the export's config.json records that
  under `megatron_dataeff.tokenizer.hf_tokenizer = false` with the tokenizer's metadata.
"""

from __future__ import annotations


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


def tokenizer_from_meta(tokenizer_meta: dict):
    """Rebuild a checkpoint's tokenizer from its recorded metadata."""
    from megatron_dataeff.data import tokenizers

    args = tokenizer_meta.get("build_args")
    if args:
        return tokenizers.build_tokenizer(**args)
    return tokenizers.build_tokenizer(tokenizer_meta["tokenizer_type"], tokenizer_meta.get("tokenizer_model"),
                                      vocab_size=tokenizer_meta.get("vocab_size"))


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
    if ttype == "GPT2BPETokenizer":
        gpt2_tokenizer_hf(_arg(tokenizer_meta, "vocab_file"), _arg(tokenizer_meta, "merge_file")).save_pretrained(out_dir)
        return True
    return False  # NullTokenizer, SentencePieceTokenizer: no faithful HF form
