"""Tokenize text into a Megatron indexed dataset; takes Megatron-LM's `tools/preprocess_data.py` flags.

    python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --append-eod --workers 8

writes `data/corpus_text_document.bin/.idx`, the same bytes Megatron-LM's script writes for the same
tokenizer. Inputs: JSONL (`.jsonl`, `.json`, `.gz`), plain text (`.txt`, `.md`: one document per
file), Parquet and `datasets.save_to_disk` directories (`.arrow`); files, globs or directories.

--split-sentences stores one sequence per sentence in `data/corpus_text_sentence.bin/.idx`, split by
NLTK's punkt model as Megatron-LM does (pip install nltk; python -m nltk.downloader punkt_tab);
`--sentence-splitter punkt-untrained` needs no model data but does not give Megatron-LM's output.
--partitions N tokenizes N parts of the input in N processes (the --workers shared among them) and
merges them; the output is the same bytes as with one partition.
"""

import sys

from megatron_dataeff.data.preprocess_cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
