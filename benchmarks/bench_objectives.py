"""Step time of masked diffusion, block diffusion and AR + token dropout relative to plain AR (same model, same
window tokens).

    python benchmarks/bench_objectives.py                     # tiny model, CPU
    python benchmarks/bench_objectives.py --model-preset small --seq-length 512 --steps 10 --json

All three trainers live in one process and are timed round-robin (median of the rounds), so the
ratios compare like with like.  Goal: mdm / ar and token-dropout / ar <= 1.03; block diffusion computes rows of
twice the window, so about 2x (and more with sdpa's dense block mask on CPUs).
"""

import argparse
import json
import statistics
import tempfile
import time
import warnings


OBJECTIVES = {
    "ar": ["--objective", "ar"],
    "ar+token_dropout": ["--objective", "ar", "--token-dropout-rate", "1.0", "--token-dropout-schedule", "uniform"],
    "mdm": ["--objective", "mdm"],
    # block diffusion: rows of [x_t | x_0], twice the window (BD3-LM), under a block mask
    "block16": ["--objective", "block", "--block-size", "16"],
}


def main() -> None:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = p.parse_args()

    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.ops import extension
    from megatron_dataeff.training.loop import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_objectives_")
    trainers = {}
    for name, flags in OBJECTIVES.items():
        argv = ["--model-preset", args.model_preset, "--seq-length", str(args.seq_length), "--micro-batch-size",
                str(args.micro_batch_size), "--train-iters", "1000000", "--device", args.device,
                "--run-dir", f"{tmp}/{name}", "--tensorboard-dir", "", *flags]
        trainers[name] = Trainer(config_from_args(build_parser().parse_args(argv)))
    step = {name: 0 for name in trainers}

    def run(name, n):
        t = trainers[name]
        start = time.perf_counter()
        for _ in range(n):
            t.train_step(step[name])
            step[name] += 1
        if t.runtime.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    for name in trainers:  # warm-up
        run(name, 2)
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name in trainers:  # the same batches for every objective
            step[name] = 2
            times[name].append(run(name, args.steps))
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    tokens = args.micro_batch_size * args.seq_length
    device = trainers["ar"].runtime.device
    kernels = extension.implementation(device)  # masking (mdm, token dropout) runs on this
    print(f"model {args.model_preset}, {args.micro_batch_size} x {args.seq_length} tokens per step, "
          f"device {device}, masking: {kernels}")
    print(f"{'objective':<20}{'ms/step':>10}{'tok/s':>12}{'vs ar':>8}")
    for name, ms in med.items():
        print(f"{name:<20}{ms:>10.1f}{tokens / ms * 1000:>12,.0f}{ms / med['ar']:>8.3f}")
    if args.json:
        print(json.dumps({"ms_per_step": med, "ratio_vs_ar": {k: v / med["ar"] for k, v in med.items()},
                          "device": device, "kernels": kernels}))
    for t in trainers.values():
        t.close()


if __name__ == "__main__":
    main()
