"""Generate text from a megatron_dataeff checkpoint (any TP/PP layout), AR or masked diffusion.

    python tools/generate.py --load runs/quickstart/checkpoints --prompt "def main(" --max-new-tokens 64
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
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    p.add_argument("--json", action="store_true", help="print one JSON line with text and token_ids")
    return p


def generate(args) -> dict:
    """{"text", "token_ids"} for parsed arguments."""
    import torch

    from megatron_dataeff.export.hf_tokenizer import tokenizer_from_meta
    from megatron_dataeff.export.kv_cache import KVCacheLogits
    from megatron_dataeff.export.sampling import ar_generate, diffusion_generate
    from megatron_dataeff.training.checkpointing import load_model_for_inference

    model, cfg, meta = load_model_for_inference(args.load, args.iteration, device=args.device)
    tokenizer = tokenizer_from_meta(meta["tokenizer"])
    eod = meta["tokenizer"].get("eod")  # None: a tokenizer without EOS/SEP; AR then runs to the end
    prompt = torch.tensor([tokenizer.tokenize(args.prompt)], dtype=torch.long)
    if prompt.shape[1] == 0:
        raise ValueError("--prompt encodes to no tokens")
    device = next(model.parameters()).device
    rows = model.embedding.word_embeddings.weight.shape[0]
    padding = range(meta["vocab_ids"], rows)
    generator = torch.Generator().manual_seed(args.seed)

    def logits_fn(ids):
        ids = ids.to(device)
        pos = torch.arange(ids.shape[1], device=device)[None, :].expand(ids.shape[0], -1)
        return model(ids, pos, None)

    if cfg.objective.bidirectional:
        out = diffusion_generate(logits_fn, prompt, args.max_new_tokens, args.block_length, args.steps,
                                 args.temperature, meta["mask_token_id"], generator, suppress_ids=padding)
    else:
        fn = logits_fn if args.no_kv_cache else KVCacheLogits(model, prompt.shape[1] + args.max_new_tokens)
        out = ar_generate(fn, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          generator, eos_token_id=eod,
                          suppress_ids=list(padding) + [meta["mask_token_id"]])
    new = out[0, prompt.shape[1]:].tolist()
    text_ids = new[: new.index(eod)] if eod in new else new
    return {"text": tokenizer.detokenize(text_ids), "token_ids": new}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)

    from megatron_dataeff.training.checkpointing import CheckpointError
    from megatron_dataeff.training.distributed import owned_process_group

    try:
        with owned_process_group():
            result = generate(args)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result) if args.json else result["text"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
