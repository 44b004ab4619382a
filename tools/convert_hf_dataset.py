"""Tokenize a Hugging Face `datasets` dataset saved to disk, or Parquet files, into an indexed dataset.

    python tools/convert_hf_dataset.py --input ~/data/fineweb_sample/train --output-prefix data/fineweb \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --append-eod --workers 8

`--input` is a `Dataset.save_to_disk` folder (one split), `.parquet` files/globs or a folder of them.
Reads with pyarrow (no `datasets` needed); same output and flags as tools/preprocess_data.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from preprocess_data import main  # noqa: E402  (the same tool; this name is for discoverability)

if __name__ == "__main__":
    sys.exit(main())
