"""The preprocessing command line (Megatron-LM's tools/preprocess_data.py flags), for the data tools.

`tools/preprocess_data.py` and `tools/convert_hf_dataset.py` are this `main`; the work is
`megatron_dataeff.data.preprocess.preprocess`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_dataeff.data.cli import add_tokenizer_args, tokenizer_from_args
from megatron_dataeff.data.preprocess import INPUT_FORMATS, SENTENCE_SPLITTERS, preprocess
from megatron_dataeff.entry import tool_main

DESCRIPTION = "Tokenize text into a Megatron indexed dataset; takes Megatron-LM's `tools/preprocess_data.py` flags."


def get_args(argv=None, description: str = DESCRIPTION) -> argparse.Namespace:
    """The flags of Megatron-LM's tools/preprocess_data.py (and ours: --partitions, --sentence-splitter, ...)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_args(parser)
    g = parser.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+", help="files, globs or directories")
    g.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from each file's extension")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize, one output each")
    g.add_argument("--skip-invalid", action="store_true",
                   help="skip records that are not JSON, not UTF-8 or lack a key, instead of stopping")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (NLTK punkt); output {prefix}_{key}_sentence.bin/.idx")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences: keep the whitespace and newlines after each sentence in it")
    g.add_argument("--sentence-splitter", choices=SENTENCE_SPLITTERS, default=None,
                   help="punkt (default): NLTK's trained model for --lang, as Megatron-LM (needs its data: python "
                        "-m nltk.downloader punkt_tab); punkt-untrained: no model data needed, but it knows no "
                        "abbreviations, so its output is NOT the same as Megatron-LM's")
    g.add_argument("--lang", default="english", help="language of the punkt model for --split-sentences")
    g = parser.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", help="append the EOD id to each document")
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="output is {prefix}_{key}_document.bin/.idx ({prefix}_{key}_sentence with --split-sentences)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (1: tokenize in this process)")
    g.add_argument("--partitions", type=int, default=1,
                   help="processes tokenizing contiguous parts of the input, sharing --workers; same output as 1")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="accepted for compatibility: documents always keep the input order, with any --partitions")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.partitions < 1:
        parser.error("--partitions must be >= 1")
    if not args.split_sentences and (args.keep_newlines or args.sentence_splitter):
        # Megatron-LM ignores --keep-newlines without --split-sentences; so do we, but say so.
        print("warning: --keep-newlines/--sentence-splitter have no effect without --split-sentences", file=sys.stderr)
    return args


@tool_main(user_error_exit=1)
def main(argv=None, description: str = DESCRIPTION) -> int:
    """Run the preprocessing a command line asks for; the exit status (1: bad input, named in one line)."""
    args = get_args(argv, description)
    tokenizer = tokenizer_from_args(args)
    try:
        summary = preprocess(args.input, args.output_prefix, tokenizer, json_keys=args.json_keys,
                             append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
                             input_format=args.input_format, skip_invalid=args.skip_invalid,
                             split_sentences=args.split_sentences, keep_newlines=args.keep_newlines,
                             sentence_splitter=args.sentence_splitter or "punkt", lang=args.lang,
                             partitions=args.partitions)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(summary.describe(), file=sys.stderr)
    return 0
