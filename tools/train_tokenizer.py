"""Train a tokenizer with a [MASK] token (plus EOD and pad) on JSONL or text files.

    # byte-level BPE -> --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/
    python tools/train_tokenizer.py --input data/*.jsonl --type bpe --vocab-size 32000 --output tok/
    # SentencePiece -> --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/sp.model
    python tools/train_tokenizer.py --input data/*.jsonl --type sentencepiece --vocab-size 32000 --output tok/sp
"""

from __future__ import annotations

import argparse
import sys

from megatron_dataeff.data.tokenizer_training import (
    default_num_threads, iter_training_texts, train_byte_level_bpe, train_sentencepiece)
from megatron_dataeff.data.tokenizers import build_tokenizer
from megatron_dataeff.entry import tool_main


@tool_main(user_error_exit=1)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, nargs="+", help="JSONL/text files, globs or folders")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe",
                        help="bpe: byte-level BPE (HF tokenizers); sentencepiece: a .model file")
    parser.add_argument("--output", required=True,
                        help="bpe: output folder; sentencepiece: model prefix ({output}.model)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--max-chars", type=float, help="train on at most this many characters")
    parser.add_argument("--min-frequency", type=int, default=2, help="bpe: least count of a merged pair")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"], help="sentencepiece model")
    parser.add_argument("--character-coverage", type=float, default=1.0, help="sentencepiece")
    parser.add_argument("--normalization", default="identity", help="sentencepiece rule, e.g. nmt_nfkc")
    parser.add_argument("--no-byte-fallback", action="store_true", help="sentencepiece: map unknown chars to <unk>")
    args = parser.parse_args(argv)
    max_chars = None if args.max_chars is None else int(args.max_chars)
    texts = iter_training_texts(args.input, args.json_key, max_chars)
    if args.type == "bpe":
        path = train_byte_level_bpe(texts, args.output, args.vocab_size, args.min_frequency)
        tok = build_tokenizer("HuggingFaceTokenizer", path)
        usage = f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {path}"
    else:
        path = train_sentencepiece(texts, args.output, args.vocab_size, args.model_type, args.character_coverage,
                                   not args.no_byte_fallback, num_threads=default_num_threads(),
                                   normalization_rule_name=args.normalization)
        tok = build_tokenizer("SentencePieceTokenizer", path)
        usage = f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {path}"
    print(f"vocab {tok.vocab_size:,}, eod {tok.eod}, mask {tok.mask_token_id}\nuse: {usage}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
