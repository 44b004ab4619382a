"""Tokenize a Hugging Face `datasets` dataset saved to disk, or Parquet files, into an indexed dataset.

    python tools/convert_hf_dataset.py --input ~/data/fineweb_sample/train --output-prefix data/fineweb \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --append-eod --workers 8

`--input` is a `Dataset.save_to_disk` folder (one split), `.parquet` files/globs or a folder of them.
Reads with pyarrow (no `datasets` needed); same output and flags as tools/preprocess_data.py.
"""

import sys

from megatron_dataeff.data.preprocess_cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
