"""Merge indexed datasets into one (documents in the order given; same token dtype required).

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/all_text_document  # every prefix in a folder
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dataeff.data.dataset_tools import merge_indexed
from megatron_dataeff.entry import tool_main


def _prefixes(inputs: list[str]) -> list[str]:
    out = []
    for item in inputs:
        if os.path.isdir(item):  # Megatron-LM's merge_datasets.py takes a folder: all its pairs, sorted
            names = sorted(n[:-4] for n in os.listdir(item) if n.endswith(".idx"))
            out += [os.path.join(item, n) for n in names if os.path.isfile(os.path.join(item, n + ".bin"))]
        else:
            out.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return out


@tool_main(user_error_exit=1)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, nargs="+", help="dataset prefixes, or folders of them")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    prefixes = _prefixes(args.input)
    info = merge_indexed(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets: {info.num_documents:,} documents, {info.num_tokens:,} tokens -> "
          f"{args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
