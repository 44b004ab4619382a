"""Write an indexed dataset back out as JSONL, one detokenized document a line, for inspection.

    python tools/indexed_to_jsonl.py --input data/corpus_text_document --output corpus.jsonl \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --limit 100
"""

from __future__ import annotations

import argparse
import sys

from megatron_dataeff.data.cli import add_tokenizer_args, tokenizer_from_args
from megatron_dataeff.data.dataset_tools import indexed_to_jsonl
from megatron_dataeff.entry import tool_main


@tool_main(user_error_exit=1)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="dataset prefix (without .bin/.idx)")
    parser.add_argument("--output", default="-", help="JSONL file, '-' for stdout")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--limit", type=int, help="only the first N documents")
    parser.add_argument("--keep-eod", action="store_true", help="do not drop a trailing EOD before detokenizing")
    parser.add_argument("--with-ids", action="store_true", help="also write the document index and token ids")
    add_tokenizer_args(parser)
    args = parser.parse_args(argv)
    tokenizer = tokenizer_from_args(args)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        n = indexed_to_jsonl(args.input, out, tokenizer, key=args.json_key, strip_eod=not args.keep_eod,
                             limit=args.limit, with_ids=args.with_ids)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"wrote {n:,} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
