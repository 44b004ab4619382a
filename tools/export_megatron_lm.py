"""Write a megatron_dataeff checkpoint's model as a Megatron-LM checkpoint (torch_dist, model only).

    python tools/export_megatron_lm.py --load runs/quickstart/ar_s1234/checkpoints --save megatron_lm/quickstart

Megatron-LM then continues from it with the model flags of the run (the model card of an HF export lists them;
`--use-checkpoint-args` reads them from the checkpoint):

    torchrun ... pretrain_gpt.py --load megatron_lm/quickstart --ckpt-format torch_dist --normalization RMSNorm \\
        --swiglu --disable-bias-linear --position-embedding-type rope --no-position-embedding ...

SAVE/release/ holds the weights under megatron-core's keys and Megatron-LM's `args`; its `no_save_optim` /
`no_save_rng` make Megatron-LM start its optimizer and RNG fresh at iteration 0.  Causal models only (AR,
token dropout, a dual model's --view ar): pretrain_gpt.py builds no bidirectional model.
"""

import argparse
import sys

from megatron_dataeff.entry import tool_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a --save directory (latest checkpoint) or one iter_N directory")
    p.add_argument("--save", required=True, help="Megatron-LM checkpoint directory to write (SAVE/release)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--view", choices=["ar"], default=None,
                   help="a dual-objective checkpoint: write it as the causal LM it also is")
    return p


@tool_main(process_group=True)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_dataeff.checkpoint.megatron_lm import write_checkpoint
    from megatron_dataeff.inference.loading import load_model_for_inference

    out = write_checkpoint(args.load, args.save, load_model_for_inference, args.iteration, view=args.view)
    print(f"wrote {args.load} -> {out} (Megatron-LM torch_dist, model only; --load {args.save})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
