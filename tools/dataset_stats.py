"""Print an indexed dataset's documents, tokens, length histogram, and the epochs a budget implies.

    python tools/dataset_stats.py --input data/corpus_text_document --unique-tokens 1e8 \\
        --train-iters 5000 --global-batch-size 256 --seq-length 2048
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_dataeff.data.dataset_tools import dataset_stats, training_tokens
from megatron_dataeff.entry import tool_main


@tool_main(user_error_exit=1)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="dataset prefix")
    parser.add_argument("--unique-tokens", type=float, help="unique-token budget (default: the whole dataset)")
    parser.add_argument("--train-tokens", type=float, help="tokens the run trains on")
    parser.add_argument("--train-iters", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    train = training_tokens(None if args.train_tokens is None else int(args.train_tokens), args.train_iters,
                            args.global_batch_size, args.seq_length)
    stats = dataset_stats(args.input, None if args.unique_tokens is None else int(args.unique_tokens), train)
    print(json.dumps(asdict(stats), indent=2) if args.json else stats.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
