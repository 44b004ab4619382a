"""Export a megatron_dataeff checkpoint (any TP/PP layout) as a Hugging Face model directory.

    python tools/export_hf.py --load runs/quickstart/ar_td0.3_random_s1234/checkpoints --output hf/quickstart --dtype bf16

An AR model becomes a stock LlamaForCausalLM (Qwen3ForCausalLM with --qk-layernorm):
`AutoModelForCausalLM.from_pretrained(HF_DIR)`.  A masked-diffusion model carries its own modeling
file: `AutoModel.from_pretrained(HF_DIR, trust_remote_code=True).generate(ids, gen_length=64,
block_length=32, steps=64)`.  The HF vocab_size is the padded embedding size (see
megatron_dataeff/export/hf_mapping.py).  OUTPUT is replaced only once the new export is complete.
"""

import argparse
import json
import os
import sys

from megatron_dataeff.entry import tool_main
from megatron_dataeff.objectives import DualObjective


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a --save directory (latest checkpoint) or one iter_N directory")
    p.add_argument("--output", required=True, help="HF model directory to write")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="weight dtype (default: bf16 for a --bf16 run, else fp32)")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size (e.g. 500MB)")
    p.add_argument("--view", choices=DualObjective.evaluation_views, default=None,
                   help="a dual-objective checkpoint: export it as a stock causal LM (ar) or as the diffusion "
                        "model with its generate (mdm)")
    return p


@tool_main(process_group=True)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_dataeff.export.hf_export import export_checkpoint

    out = export_checkpoint(args.load, args.output, args.iteration, args.dtype, args.max_shard_size, view=args.view)
    print(f"exported {args.load} -> {out}")
    tokenizer = json.load(open(os.path.join(out, "config.json")))["megatron_dataeff"]["tokenizer"]
    if not tokenizer["hf_tokenizer"]:
        print(f"note: no tokenizer written: {tokenizer['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
