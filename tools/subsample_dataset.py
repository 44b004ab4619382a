"""Subsample an indexed dataset to a token budget, in whole documents, deterministically for a seed.

    python tools/subsample_dataset.py --input data/corpus_text_document --tokens 100000000 --seed 1234 \\
        --output-prefix data/corpus100M_text_document

Documents are visited in a seeded random order and every one that still fits is taken (total <= the
budget); `--at-least` stops at the first document that reaches it instead. The chosen documents keep
their original order.
"""

from __future__ import annotations

import argparse
import sys

from megatron_dataeff.data.dataset_tools import subsample_indexed
from megatron_dataeff.entry import tool_main


@tool_main(user_error_exit=1)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="dataset prefix")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokens", type=float, required=True, help="token budget (1e8 is fine)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--at-least", action="store_true", help="reach the budget (the last document may overshoot)")
    args = parser.parse_args(argv)
    info, chosen = subsample_indexed(args.input, args.output_prefix, int(args.tokens), args.seed, args.at_least)
    print(f"kept {chosen.size:,} documents, {info.num_tokens:,} tokens (budget {int(args.tokens):,}) -> "
          f"{args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
