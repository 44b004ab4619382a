"""Build the embedded default corpus (Python stdlib docstrings) with any tokenizer, or export it as JSONL.

    python tools/build_corpus.py --tokenizer-type ByteTokenizer                  # into the cache
    python tools/build_corpus.py --jsonl stdlib_docstrings.jsonl                 # the raw text only
    python tools/build_corpus.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ \\
        --cache-dir data/                                                        # another tokenizer

The trainer builds the corpus by itself on first use (no --data-path); this tool does the same
ahead of time and prints the prefix to pass as `--data-path`.  It is the same pipeline as
`tools/preprocess_data.py --append-eod` on the exported JSONL.
"""

from __future__ import annotations

import argparse
import sys

from megatron_dataeff.data.cli import add_tokenizer_args, tokenizer_from_args
from megatron_dataeff.data.corpus import embedded_corpus, write_jsonl
from megatron_dataeff.entry import tool_main


@tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_args(parser, required=False)
    parser.add_argument("--cache-dir", help="where the tokenized corpus goes (default: the trainer's cache)")
    parser.add_argument("--jsonl", help="only write the corpus text as JSONL to this path")
    args = parser.parse_args(argv)
    if args.jsonl:
        n = write_jsonl(args.jsonl)
        print(f"wrote {n} documents to {args.jsonl}")
        return 0
    args.tokenizer_type = args.tokenizer_type or "ByteTokenizer"
    prefix = embedded_corpus(tokenizer_from_args(args), args.cache_dir)
    print(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
