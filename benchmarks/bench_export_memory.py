"""Peak host memory of HF export and import at a real model's shape, against the output shard and the model.

    python benchmarks/bench_export_memory.py                                # qwen3-1.7b, bf16, 2GB shards
    python benchmarks/bench_export_memory.py --model-preset qwen3-0.6b --max-shard-size 1GB

A randomly initialised model of the preset's shape (with Qwen3's 151,936-row vocabulary: a NullTokenizer of that
size) is saved as a bf16 model-only checkpoint; then, each in a fresh process so that its peak is its own:

* export (streaming)   tools/export_hf.py's path: `export_checkpoint`, one layer read at a time
* export (whole model) the baseline: the model loaded (load_model_for_inference), then `export_model`
* import               tools/import_hf.py's path: `import_hf` of the streaming export

Each reports its peak resident memory above what the process held before the work (imports done), in GiB, and
that as a multiple of one output shard and of the model's bytes.  Goal: export near one shard (it holds a
shard being filled and one layer); import near the model in fp32 (the model it saves), not a multiple of it.
Needs about 3x the model's bf16 bytes of free disk.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

QWEN3_VOCAB = 151936


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _config(preset: str):
    from megatron_dataeff.arguments import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(
        ["--model-preset", preset, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(QWEN3_VOCAB - 1),
         "--bf16", "--device", "cpu"]))
    cfg.validate_layout(1)
    return cfg


def _stage(args) -> dict:
    """One measured step, in this process."""
    import torch

    from megatron_dataeff.distributed import initialize

    initialize(1, 1, 1234, "cpu")
    start_rss, start = _rss_gib(), time.perf_counter()
    if args.stage == "make":
        from megatron_dataeff.data.tokenizers import build_tokenizer, resolve_mask_token
        from megatron_dataeff.export.hf_import import save_model_checkpoint
        from megatron_dataeff.models.builder import build_model

        cfg = _config(args.model_preset)
        tok = build_tokenizer("NullTokenizer", None, vocab_size=QWEN3_VOCAB - 1)
        mask, vocab_ids = resolve_mask_token(tok)
        model = build_model(cfg, vocab_ids, "cpu").to(torch.bfloat16)
        meta = {"iteration": 1, "consumed_samples": 0, "epoch": 0.0, "scheduler": None, "config": cfg.to_dict(),
                "tokenizer": tok.metadata(), "mask_token_id": mask, "vocab_ids": vocab_ids, "unique_tokens": None,
                "world_size": 1, "model_only": True}
        save_model_checkpoint(model, meta, args.ckpt)
        numel = sum(p.numel() for p in model.parameters())
        return {"stage": "make", "parameters": numel, "model_bf16_gib": numel * 2 / 2**30}
    if args.stage == "export-stream":
        from megatron_dataeff.export.hf_export import export_checkpoint

        export_checkpoint(args.ckpt, args.out, dtype="bf16", max_shard_size=args.max_shard_size)
    elif args.stage == "export-model":
        from megatron_dataeff.export.hf_export import export_model
        from megatron_dataeff.inference.loading import load_model_for_inference

        model, cfg, meta = load_model_for_inference(args.ckpt)
        export_model(model, cfg, meta, args.out, dtype="bf16", max_shard_size=args.max_shard_size)
    elif args.stage == "import":
        from megatron_dataeff.export.hf_import import import_hf

        import_hf(args.out, args.ckpt, log=lambda *a: None)
    return {"stage": args.stage, "peak_above_start_gib": _peak_gib() - start_rss, "start_gib": start_rss,
            "seconds": time.perf_counter() - start}


def _run(stage: str, args, ckpt: str, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--model-preset", args.model_preset,
           "--max-shard-size", args.max_shard_size, "--ckpt", ckpt, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-preset", default="qwen3-1.7b")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--workdir", default=None, help="where the checkpoint and exports go (default: a temporary "
                                                    "directory, removed at the end)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line too")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        print(json.dumps(_stage(args)), flush=True)
        return
    from megatron_dataeff.export.hf_export import parse_size

    work = args.workdir or tempfile.mkdtemp(prefix="bench_export_memory_")
    try:
        made = _run("make", args, os.path.join(work, "ckpt"), "")
        shard = parse_size(args.max_shard_size) / 2**30
        print(f"{args.model_preset}: {made['parameters'] / 1e9:.2f}B parameters, {made['model_bf16_gib']:.2f} GiB in "
              f"bf16 ({made['model_bf16_gib'] * 2:.2f} GiB fp32); shards of {args.max_shard_size} = {shard:.2f} GiB")
        results = [made]
        print(f"{'':24s} {'peak above start':>17s} {'x shard':>8s} {'x model bf16':>13s} {'seconds':>8s}")
        for stage, out in (("export-stream", "hf"), ("export-model", "hf_whole"), ("import", "hf")):
            ckpt = os.path.join(work, "imported" if stage == "import" else "ckpt")
            r = _run(stage, args, ckpt, os.path.join(work, out))
            results.append(r)
            print(f"{stage:24s} {r['peak_above_start_gib']:14.2f} GiB {r['peak_above_start_gib'] / shard:8.2f} "
                  f"{r['peak_above_start_gib'] / made['model_bf16_gib']:13.2f} {r['seconds']:8.1f}")
        stream, whole = results[1]["peak_above_start_gib"], results[2]["peak_above_start_gib"]
        print(f"streaming export / whole-model export peak: {stream / whole:.2f}")
        if args.json:
            print(json.dumps({"preset": args.model_preset, "max_shard_size": args.max_shard_size, "results": results}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
