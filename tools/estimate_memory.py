"""Per-GPU memory of a training configuration, before asking a cluster for it.

    python tools/estimate_memory.py --model-preset qwen3-0.6b --seq-length 4096 --bf16 --micro-batch-size 4 \\
        --tokenizer-type HuggingFaceTokenizer --world-size 8 --tensor-model-parallel-size 2 --sequence-parallel

Takes the trainer's own flags (`pretrain_diffusion.py --help`), plus --world-size, --vocab-ids and
--gpu-memory-gb, and prints, for the most loaded rank, parameters, gradients, optimizer state,
activations, the loss's logits, the largest transient and the stated allowances, then whether the peak
fits each device size.  Nothing is built and torch is not imported (megatron_dataeff.training.memory).
--device cpu estimates a CPU run (what the tests check against measured peak RSS); auto means cuda here.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.entry import tool_main
from megatron_dataeff.models.loss_choice import loss_for_config
from megatron_dataeff.training.memory import GiB, MemoryEstimate, default_capacity, device_capacity, estimate_stages

QWEN3_IDS = 151_670  # Qwen3's tokenizer: 151,669 ids (len(tokenizer)), plus the mask token the trainer appends


def _parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "estimate_memory.py"
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("memory estimate")
    g.add_argument("--world-size", type=int, default=1, help="processes (GPUs) of the job")
    g.add_argument("--vocab-ids", type=int, default=None,
                   help="ids the model embeds, mask token included, before padding (default: from --tokenizer-type "
                        f"when it is given and needs no file or its file exists, else {QWEN3_IDS:,}: Qwen3's "
                        "tokenizer, 151,669 ids, plus the mask token the trainer appends)")
    g.add_argument("--gpu-memory-gb", default="80,141", help="device sizes to check, GB as sold (comma-separated)")
    g.add_argument("--transformer-engine", action="store_true",
                   help="the cluster has transformer-engine (--attention-backend auto then means TE's attention)")
    g.add_argument("--all-stages", action="store_true", help="one table per pipeline stage")
    g.add_argument("--summary", action="store_true", help="one line per configuration")
    p.set_defaults(tokenizer_type=None)  # not given: the Qwen3 vocabulary, not the trainer's byte default
    return p


def _vocab_ids(args) -> tuple[int, str]:
    """(ids, where they came from)."""
    if args.vocab_ids is not None:
        return args.vocab_ids, "--vocab-ids"
    if args.tokenizer_type is None:
        return QWEN3_IDS, "Qwen3's tokenizer + mask (no --tokenizer-type given)"
    needs_file = args.tokenizer_type in ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer")
    files = [f for f in (args.tokenizer_model, args.vocab_file) if f]
    if needs_file and not (files and all(os.path.exists(f) for f in files)):
        return QWEN3_IDS, f"Qwen3's tokenizer + mask ({args.tokenizer_type} without a file)"
    from megatron_dataeff.data.tokenizers import build_tokenizer, resolve_mask_token

    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_file=args.vocab_file,
                          merge_file=args.merge_file, vocab_size=args.vocab_size)
    return resolve_mask_token(tok)[1], args.tokenizer_type


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f}"


def _table(est: MemoryEstimate, sizes: list[float]) -> str:
    p = est.per_layer
    rows = [
        (f"parameters ({est.num_parameters / 1e9:.3f} B on this rank)", est.parameters),
        ("gradient buffer", est.gradients),
        ("optimizer state (Adam m, v; fp32 masters)", est.optimizer_state),
        ("megatron global buffer", est.buffers),
        (f"activations ({est.layers} layers x {est.micro_batches_in_flight} micro-batch(es) in flight; "
         f"{sum(p.values()) / GiB:.3f} GiB a layer)", est.activations),
        ("loss (logits kept for backward)", est.loss),
        (f"transient at the peak ({est.peak_moment if est.peak_moment != 'optimizer step' else 'backward'})",
         est.transient),
    ]
    lines = [f"pipeline stage {est.stage} of {est.num_stages} (every TP / DP rank of it alike); GiB"]
    lines += [f"  {name:<74s}{_gib(n)}" for name, n in rows]
    lines.append(f"  {'optimizer step (instead of the activations)':<74s}{_gib(est.optimizer_step)}")
    lines.append(f"  {'estimated peak (' + est.peak_moment + ')':<74s}{_gib(est.total)}")
    for name, n in est.allowances.items():
        lines.append(f"  {'+ allowance: ' + name:<74s}{_gib(n)}")
    lines.append(f"  {'peak with allowances':<74s}{_gib(est.total_with_allowances)}")
    fits = est.fits(sizes)
    lines.append("  fits: " + ", ".join(
        f"{g:g} GB ({device_capacity(g) / GiB:.1f} GiB): {'yes' if ok else 'NO'}" for g, ok in fits.items()))
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


@tool_main(user_error_exit=1)
def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ids, source = _vocab_ids(args)
    args.tokenizer_type = args.tokenizer_type or "HuggingFaceTokenizer"
    cfg = config_from_args(args)
    device = "cpu" if args.device == "cpu" else "cuda"
    sizes = [float(x) for x in args.gpu_memory_gb.split(",") if x.strip()]
    # the automatic loss is chosen for the smallest device listed (models/loss_choice.py)
    capacity = device_capacity(min(sizes)) if device == "cuda" and sizes else None
    stages = estimate_stages(cfg, args.world_size, ids, device, te_available=args.transformer_engine,
                             capacity_bytes=capacity)
    loss = loss_for_config(cfg, ids, capacity if capacity is not None else default_capacity(device), device)
    worst = max(stages, key=lambda e: e.total_with_allowances)
    m, p, c = cfg.model, cfg.parallel, cfg.compute
    recompute = c.recompute_granularity or "off"
    if c.recompute_granularity == "full":
        recompute += f" {c.recompute_method} {c.recompute_num_layers}"
    elif c.recompute_granularity == "selective":
        recompute += " " + "+".join(c.recompute_modules or ["core_attn"])
    if args.summary:
        fits = " ".join(f"{g:g}GB:{'yes' if ok else 'no'}" for g, ok in worst.fits(sizes).items())
        print(f"{args.model_preset} seq {m.seq_length} mbs {cfg.optim.micro_batch_size} {c.attention_backend} "
              f"recompute {recompute}: peak {worst.total / GiB:.1f} GiB (+{sum(worst.allowances.values()) / GiB:.1f} "
              f"allowances) = {worst.total_with_allowances / GiB:.1f} GiB at {worst.peak_moment} | {fits}")
        return 0
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    print(f"{args.model_preset}: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
          f"{m.num_attention_heads}/{m.num_query_groups}, seq {m.seq_length}, micro-batch "
          f"{cfg.optim.micro_batch_size}, {'bf16' if cfg.optim.bf16 else 'fp32'}, {ids:,} ids ({source})")
    print(f"world {args.world_size} = TP {tp} x PP {pp} x DP {args.world_size // (tp * pp)}; {device}; attention "
          f"{c.attention_backend}; recompute {recompute}; sequence parallel {'on' if p.sequence_parallel else 'off'}; "
          f"distributed optimizer {'on' if p.use_distributed_optimizer else 'off'}")
    print(loss.describe() + (f" (on the smallest device listed, {min(sizes):g} GB)" if capacity else ""))
    print("most loaded rank: " + _table(worst, sizes))
    if args.all_stages:
        for est in stages:
            if est is not worst:
                print(_table(est, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
