"""Command-line pieces shared by the data tools: Megatron-LM's tokenizer flags."""

from __future__ import annotations

import argparse

from megatron_dataeff.data.tokenizers import TOKENIZER_TYPES, Tokenizer, build_tokenizer


def add_tokenizer_args(parser: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
    """`--tokenizer-type/--tokenizer-model/--vocab-file/--merge-file/--vocab-size`, as Megatron-LM names them."""
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=required, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="HF tokenizer directory / tokenizer.json, or SentencePiece .model")
    g.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids before EOD (EOD = this value)")
    g.add_argument("--legacy-tokenizer", action="store_true", help="accepted for compatibility; no effect")
    return parser


def tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    """The tokenizer `add_tokenizer_args`'s flags name."""
    return build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, vocab_size=args.vocab_size)
