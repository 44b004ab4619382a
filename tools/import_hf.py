"""Import a Hugging Face Llama / Qwen3 model directory (or our diffusion export) as a checkpoint.

    python tools/import_hf.py --hf-dir hf/my-llama --save checkpoints/my-llama --objective ar

The result is a model-only checkpoint (iteration 0, `"model_only": true` in megatron_dataeff.json)
saved with dist_checkpointing, so it loads at any TP/PP; `--tensor-model-parallel-size` /
`--pipeline-model-parallel-size` only check (and record) the layout you mean to load it with.  The
tokenizer is recorded as HuggingFaceTokenizer with the HF directory as --tokenizer-model.  Load it
with the model shape it records (the printed --make-vocab-size-divisible-by in particular).
"""

import argparse
import sys

from megatron_dataeff.entry import tool_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="local HF model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint directory to write (like pretrain's --save)")
    p.add_argument("--objective", choices=["ar", "mdm"], default=None,
                   help="objective to record (default: mdm for our diffusion exports, else ar)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=None, help="default: min(max_position_embeddings, 4096)")
    return p


@tool_main(process_group=True)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_dataeff.export.hf_import import import_hf
    from megatron_dataeff.checkpoint.format import read_metadata

    ckpt = import_hf(args.hf_dir, args.save, args.objective, args.tensor_model_parallel_size,
                     args.pipeline_model_parallel_size, args.seq_length)
    m = read_metadata(ckpt)["config"]["model"]
    print(f"imported {args.hf_dir} -> {ckpt} (model-only; --make-vocab-size-divisible-by "
          f"{m['make_vocab_size_divisible_by']}, --num-layers {m['num_layers']}, --hidden-size {m['hidden_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
