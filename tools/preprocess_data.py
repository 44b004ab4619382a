"""Tokenize text into a Megatron indexed dataset; takes Megatron-LM's `tools/preprocess_data.py` flags.

    python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --append-eod --workers 8

writes `data/corpus_text_document.bin/.idx`, the same bytes Megatron-LM's script writes for the same
tokenizer. Inputs: JSONL (`.jsonl`, `.json`, `.gz`), plain text (`.txt`, `.md`: one document per
file), Parquet and `datasets.save_to_disk` directories (`.arrow`); files, globs or directories.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_dataeff.data.cli import add_tokenizer_args, tokenizer_from_args  # noqa: E402
from megatron_dataeff.data.preprocess import INPUT_FORMATS, PreprocessError, preprocess  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_args(parser)
    g = parser.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+", help="files, globs or directories")
    g.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from each file's extension")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize, one output each")
    g.add_argument("--skip-invalid", action="store_true",
                   help="skip records that are not JSON, not UTF-8 or lack a key, instead of stopping")
    g.add_argument("--split-sentences", action="store_true", help="not supported (needs NLTK)")
    g.add_argument("--keep-newlines", action="store_true", help="only with --split-sentences; not supported")
    g = parser.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", help="append the EOD id to each document")
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="output is {prefix}_{key}_document.bin/.idx")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (1: tokenize in this process)")
    g.add_argument("--partitions", type=int, default=1, help="accepted for compatibility; output is one dataset")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    args = parser.parse_args(argv)
    if args.split_sentences or args.keep_newlines:
        parser.error("--split-sentences/--keep-newlines are not supported: split sentences beforehand and store "
                     "them as a list of strings under the key (each becomes one sequence)")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        tokenizer = tokenizer_from_args(args)
        summary = preprocess(args.input, args.output_prefix, tokenizer, json_keys=args.json_keys,
                             append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
                             input_format=args.input_format, skip_invalid=args.skip_invalid)
    except (PreprocessError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(summary.describe(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
