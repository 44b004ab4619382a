"""Generate text from a megatron_dataeff checkpoint (any TP/PP layout), AR or masked diffusion.

    python tools/generate.py --load runs/quickstart/ar_td0.3_random_s1234/checkpoints --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load ckpt --prompt "Once" --max-new-tokens 64 --temperature 0.8 --top-p 0.9 --seed 1
    python tools/generate.py --load mdm_ckpt --prompt "Once" --max-new-tokens 64 --block-length 32 --steps 64 --json

AR models decode left to right (greedy at --temperature 0, the default; otherwise temperature with
optional --top-k / --top-p) with a KV cache (megatron-core's static inference context; --no-kv-cache
recomputes the whole sequence each step instead, same greedy tokens), and stop at the tokenizer's
end-of-document token.  Masked-diffusion models run the sampler of the exported HF modeling file
(`diffusion_generate`: --max-new-tokens masks filled in blocks of --block-length over --steps steps,
lowest-confidence predictions remasked, Gumbel noise at --temperature > 0), so the same --seed gives
the same tokens as the exported model's `generate`.  --json prints one line:
{"text": ..., "token_ids": [...]} with the generated ids (prompt excluded).
"""

import argparse
import json
import sys

from megatron_dataeff.entry import tool_main
from megatron_dataeff.objectives import DualObjective


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a --save directory (latest checkpoint) or one iter_N directory")
    p.add_argument("--iteration", type=int, default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy / argmax")
    p.add_argument("--top-k", type=int, default=None, help="AR only")
    p.add_argument("--top-p", type=float, default=None, help="AR only")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=None, help="diffusion: denoising steps (default: max-new-tokens)")
    p.add_argument("--block-length", type=int, default=None,
                   help="diffusion: semi-autoregressive block size (default: max-new-tokens)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="AR: recompute the whole sequence each step instead of decoding with a KV cache")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--view", choices=DualObjective.evaluation_views, default=None,
                   help="a dual-objective checkpoint: decode it as a causal LM (ar) or with the diffusion sampler (mdm)")
    p.add_argument("--json", action="store_true", help="print one JSON line with text and token_ids")
    return p


@tool_main(process_group=True)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_dataeff.inference.generate import generate_text

    result = generate_text(args.load, args.prompt, args.max_new_tokens, iteration=args.iteration,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           steps=args.steps, block_length=args.block_length, kv_cache=not args.no_kv_cache,
                           device=args.device, view=args.view)
    print(json.dumps(result) if args.json else result["text"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
