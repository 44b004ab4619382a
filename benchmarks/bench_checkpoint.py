"""How long a checkpoint save holds training: synchronous save vs --async-save (same trainer, same state).

    python benchmarks/bench_checkpoint.py                               # small model, CPU
    python benchmarks/bench_checkpoint.py --model-preset qwen3-0.6b --seq-length 4096 --micro-batch-size 1 \\
        --bf16 --json                                                   # the paper's model on a GPU

One trainer saves to a temporary --save directory, alternating a synchronous save and a background one,
for --rounds rounds.  For each it reports the time training was held (the save call), and for the
background save also the time until it was published (every rank's writer done, renamed, `latest`
advanced) and the step time while the writer ran, against the step time with no save in flight.
Goal: the held time of --async-save is a small fraction of the synchronous save's.
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def _step(trainer, n: int) -> float:
    """Seconds per step over n training steps."""
    start = time.perf_counter()
    for _ in range(n):
        trainer.train_step(trainer.state.iteration)
        trainer.state.iteration += 1
        trainer.state.consumed_samples += trainer.cfg.optim.global_batch_size
    if trainer.runtime.device == "cuda":
        import torch

        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main() -> None:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="small")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--save-dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = p.parse_args()

    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.checkpoint.format import (checkpoint_iterations, checkpoint_name, file_problems, file_record,
                                                    read_metadata)
    from megatron_dataeff.training.loop import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_checkpoint_")
    save_dir = args.save_dir or f"{tmp}/ckpt"
    argv = ["--model-preset", args.model_preset, "--seq-length", str(args.seq_length), "--micro-batch-size",
            str(args.micro_batch_size), "--train-iters", "1000000", "--device", args.device, "--run-dir",
            f"{tmp}/run", "--tensorboard-dir", "", "--save", save_dir, "--async-save", "--eval-iters", "0",
            *(["--bf16"] if args.bf16 else [])]
    trainer = Trainer(config_from_args(build_parser().parse_args(argv)))
    trainer.log.print = lambda line: None  # the save lines; this script prints its own table
    try:
        _step(trainer, 2)  # warm-up
        base = _step(trainer, 3)
        trainer._save_checkpoint(blocking=False)  # the first background save starts megatron's helpers
        trainer.checkpoints.finish(blocking=True)
        rows = {"sync_held_s": [], "async_held_s": [], "async_published_s": [], "step_s_while_writing": []}
        for _ in range(args.rounds):
            _step(trainer, 1)
            start = time.perf_counter()
            trainer._save_checkpoint(blocking=True)
            rows["sync_held_s"].append(time.perf_counter() - start)
            _step(trainer, 1)
            start = time.perf_counter()
            trainer._save_checkpoint(blocking=False)
            rows["async_held_s"].append(time.perf_counter() - start)
            steps, stepped = 0, 0.0
            while trainer.checkpoints.async_saves.get_num_unfinalized_calls():
                stepped += _step(trainer, 1)
                steps += 1
                trainer.checkpoints.finish(blocking=False)
            rows["async_published_s"].append(time.perf_counter() - start)
            if steps:
                rows["step_s_while_writing"].append(stepped / steps)
        med = {k: statistics.median(v) if v else float("nan") for k, v in rows.items()}
        size = sum(f.stat().st_size for f in Path(save_dir).rglob("*") if f.is_file())
        iters = len([d for d in os.listdir(save_dir) if d.startswith("iter_")])
        print(f"model {args.model_preset} ({trainer.num_parameters / 1e6:.1f}M parameters), device "
              f"{trainer.runtime.device}, {size / max(iters, 1) / 2**20:.0f} MiB per checkpoint, "
              f"median of {args.rounds} rounds")
        print(f"{'':<34}{'seconds':>10}")
        print(f"{'synchronous save: training held':<34}{med['sync_held_s']:>10.3f}")
        print(f"{'--async-save: training held':<34}{med['async_held_s']:>10.3f}")
        print(f"{'--async-save: published after':<34}{med['async_published_s']:>10.3f}")
        print(f"{'step, no save in flight':<34}{base:>10.3f}")
        print(f"{'step, background writer running':<34}{med['step_s_while_writing']:>10.3f}")
        print(f"held time, async / sync: {med['async_held_s'] / med['sync_held_s']:.3f}")
        # The manifest (size + CRC-32 of every file, computed at publication) and its check at load.
        newest = os.path.join(save_dir, checkpoint_name(checkpoint_iterations(save_dir)[-1]))
        manifest = read_metadata(newest)["files"]
        start = time.perf_counter()
        for name in manifest:
            file_record(os.path.join(newest, name))
        crc_s = time.perf_counter() - start
        start = time.perf_counter()
        assert not file_problems(newest, manifest, sorted(manifest))
        verify_s = time.perf_counter() - start
        mib = sum(r["size"] for r in manifest.values()) / 2**20
        print(f"checksums at save: {crc_s:.3f} s ({mib / max(crc_s, 1e-9):,.0f} MiB/s); synchronous save with / "
              f"without them: {med['sync_held_s']:.3f} / {med['sync_held_s'] - crc_s:.3f} s "
              f"(ratio {med['sync_held_s'] / max(med['sync_held_s'] - crc_s, 1e-9):.3f}); verification at load "
              f"{verify_s:.3f} s")
        med.update(checksum_s=crc_s, verify_s=verify_s)
        if args.json:
            print(json.dumps({**med, "step_s": base, "held_ratio": med["async_held_s"] / med["sync_held_s"],
                              "device": trainer.runtime.device}))
    finally:
        trainer.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
