"""The paper's experiment grid: methods, scales, and the pretrain_diffusion.py command of each run.

Methods (Gao et al. 2025, see docs/evaluation.md):

    ar                      AR baseline (weight decay 0.1, as the paper's baseline)
    ar_td{0.1,0.3,0.5}      AR + token dropout, each input token masked with probability R
    ar_td1.0                AR + the paper's "diffusion-style masked input": per sequence r ~ U(0, 1)
    ar_attn{0.1,0.3,0.5}    AR + attention dropout
    ar_mlp{0.1,0.3,0.5}     AR + MLP dropout (on the MLP's inner activation)
    ar_wd{0.3,0.5}          AR + weight decay 0.3 / 0.5 (wd 0.1 is the baseline `ar`)
    ar_wd{1.0,3.0}          AR + weight decay 1.0 / 3.0: Kim et al. 2025 find the best weight decay for
                            data-constrained pretraining ~30x the usual 0.1 (not in the paper's grid)
    mdm                     masked diffusion
    ar_fresh, mdm_fresh     references without repetition: the same number of steps on
                            unique_tokens x epochs fresh tokens (1 epoch); they calibrate the
                            effective-data fit (R*) and are not part of the paper's grid
    beyond the paper (not in its grid; in both scales' default lists):
    ar_td0.3_{random,mixed} token dropout 0.3 with random-token / BERT 80-10-10 replacement
    ar_td0.3_span3          token dropout 0.3 in geometric spans of mean 3
    ar_td0.5_anneal         token dropout annealed linearly from 0.5 to 0 over the run
    ar_mir0.3               masked-input regularisation: the clean loss + 0.5 x the loss at token dropout 0.3
    ar_mlp0.1_td0.3         MLP dropout 0.1 and token dropout 0.3 together
    dual                    the dual objective: half the samples AR, half masked diffusion (its validation
                            loss is the AR NLL, comparable with the AR methods')
    ar_doc, ar_td0.3_doc,   ar, ar_td0.3 and mdm on packed documents that do not see each other
    mdm_doc                 (--reset-attention-mask --reset-position-ids --eod-mask-loss): does confining
                            attention to the document change the comparison?
    block{4,16,128}         block diffusion (BD3-LM) with blocks of 4 / 16 tokens, between AR and masked
                            diffusion; block128 is one block of the demo's 128-token window, a check against mdm
    block4_clip             block4 trained on a clipped schedule, rates in [0.3, 0.8) (--mdm-t-min/--mdm-t-max;
                            validation is the same ELBO): does BD3-LM's variance reduction matter here?
    ar_u{0.5,2,4}           plain AR at 0.5 / 2 / 4 x the unique tokens, the same number of steps (so
                            2 / 0.5 / 0.25 x the epochs): with `ar` they give best loss vs unique
                            tokens, through which each method's best loss becomes an effective-data
                            multiple (experiments/statistics.py); not part of the paper's grid

A token-dropout rate of 1.0 with a fixed rate would mask every input token, so the 1.0 point of
the sweep is the per-sequence uniform schedule (the paper's masked-input condition); 0.1-0.5 are
fixed rates.  That reading of the paper's sweep is ours (its code is not released).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

# Megatron-LM's packed-document flags (objectives/documents.py)
DOCUMENT_FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
METHODS: dict[str, list[str]] = {
    "ar": [],
    "ar_td0.1": ["--token-dropout-rate", "0.1"],
    "ar_td0.3": ["--token-dropout-rate", "0.3"],
    "ar_td0.5": ["--token-dropout-rate", "0.5"],
    "ar_td1.0": ["--token-dropout-rate", "1.0", "--token-dropout-schedule", "uniform"],
    "ar_attn0.1": ["--attention-dropout", "0.1"],
    "ar_attn0.3": ["--attention-dropout", "0.3"],
    "ar_attn0.5": ["--attention-dropout", "0.5"],
    "ar_mlp0.1": ["--mlp-dropout", "0.1"],
    "ar_mlp0.3": ["--mlp-dropout", "0.3"],
    "ar_mlp0.5": ["--mlp-dropout", "0.5"],
    "ar_wd0.3": ["--weight-decay", "0.3"],
    "ar_wd0.5": ["--weight-decay", "0.5"],
    "ar_wd1.0": ["--weight-decay", "1.0"],
    "ar_wd3.0": ["--weight-decay", "3.0"],
    "mdm": ["--objective", "mdm"],
    "ar_td0.3_random": ["--token-dropout-rate", "0.3", "--token-dropout-noise", "random"],
    "ar_td0.3_mixed": ["--token-dropout-rate", "0.3", "--token-dropout-noise", "mixed"],
    "ar_td0.3_span3": ["--token-dropout-rate", "0.3", "--token-dropout-span", "3"],
    "ar_td0.5_anneal": ["--token-dropout-rate", "0.5", "--token-dropout-anneal", "linear"],
    "ar_mir0.3": ["--token-dropout-rate", "0.3", "--token-dropout-aux-weight", "0.5"],
    "ar_mlp0.1_td0.3": ["--mlp-dropout", "0.1", "--token-dropout-rate", "0.3"],
    "dual": ["--objective", "dual", "--ar-fraction", "0.5"],
    "ar_doc": DOCUMENT_FLAGS,
    "ar_td0.3_doc": ["--token-dropout-rate", "0.3", *DOCUMENT_FLAGS],
    "mdm_doc": ["--objective", "mdm", *DOCUMENT_FLAGS],
    "block4": ["--objective", "block", "--block-size", "4"],
    "block16": ["--objective", "block", "--block-size", "16"],
    "block128": ["--objective", "block", "--block-size", "128"],
    "block4_clip": ["--objective", "block", "--block-size", "4", "--mdm-t-min", "0.3", "--mdm-t-max", "0.8"],
    "ar_fresh": [],
    "mdm_fresh": ["--objective", "mdm"],
    "ar_u0.5": [],
    "ar_u2": [],
    "ar_u4": [],
}
FRESH = {"ar_fresh": "ar", "mdm_fresh": "mdm"}  # reference run -> the family it calibrates
BUDGETS = {"ar_u0.5": 0.5, "ar": 1.0, "ar_u2": 2.0, "ar_u4": 4.0}  # plain AR at F x the unique tokens
BEYOND = ["ar_wd1.0", "ar_wd3.0", "ar_td0.3_random", "ar_td0.3_mixed", "ar_td0.3_span3", "ar_td0.5_anneal", "ar_mir0.3", "ar_mlp0.1_td0.3",
          "dual", "ar_doc", "ar_td0.3_doc", "mdm_doc", "block4", "block16", "block128",
          "block4_clip"]
PAPER_METHODS = [m for m in METHODS if m not in FRESH and m not in BEYOND and (m not in BUDGETS or m == "ar")]


def reference_of(method: str) -> str:
    """The fresh-data reference whose loss-vs-tokens curve calibrates a method's effective data."""
    return "mdm_fresh" if METHODS[method][:2] in (["--objective", "mdm"], ["--objective", "block"]) else "ar_fresh"


@dataclass
class Scale:
    """One scale of the study: model, budget, schedule, and how runs are launched."""

    name: str
    unique_tokens: int
    epochs: float
    seq_length: int
    global_batch_size: int
    flags: list[str] = field(default_factory=list)  # model / optimizer / logging flags
    evals_per_epoch: float = 2.0  # validation points per epoch
    downstream_evals: int = 3  # checkpoints evaluated on the offline tasks (evenly spaced)
    num_examples: int = 100  # offline task examples
    mc_samples: int = 8  # diffusion answer ELBO samples for the offline tasks
    default_methods: list[str] = field(default_factory=list)
    distributed: bool = False  # launch with torchrun (GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR/PORT)
    seconds_per_step: Optional[float] = None  # measured on a 2-core CPU, evaluations included: the estimate

    def cost(self, method: str) -> float:
        """A method's step time relative to plain AR's (MIR runs each sample twice)."""
        return 2.0 if "--token-dropout-aux-weight" in METHODS[method] else 1.0

    def steps_per_epoch(self) -> float:
        samples = (self.unique_tokens - 1) // self.seq_length
        return samples / self.global_batch_size


def _cpu_flags(hidden: int, ffn: int) -> list[str]:
    """The CPU scales' model / optimizer / logging flags: 2 layers of width `hidden`, 16 x 128 tokens a step."""
    return ["--num-layers", "2", "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
            "--micro-batch-size", "16", "--global-batch-size", "16", "--split", "90,10,0",
            "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "30", "--lr-decay-style", "cosine",
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--eval-iters", "4", "--device", "cpu",
            "--tensorboard-dir", ""]


SCALES: dict[str, Scale] = {
    # The embedded corpus on a 2-core CPU: 0.44M parameters, 50k unique tokens, 20 epochs
    # (about 490 steps of 16 x 128 tokens per run).  AR's validation loss bottoms out around
    # the middle of the run and rises after.
    "tiny": Scale(
        name="tiny", unique_tokens=50_000, epochs=20, seq_length=128, global_batch_size=16,
        flags=_cpu_flags(hidden=128, ffn=384),
        evals_per_epoch=2.0, downstream_evals=3, num_examples=100, mc_samples=8,
        default_methods=list(METHODS), seconds_per_step=0.15,  # 16 runs of 488 steps in 20 minutes
    ),
    # The CPU demo: 2 layers, hidden 192 (1.0M parameters), 20k unique tokens for 30 epochs (293 steps of
    # 16 x 128 tokens, about a minute a run on 2 cores): plain AR's validation loss bottoms out near epoch 11
    # and then rises by about 1.1 nats (measured, one seed), so what the regularisers prevent is plain.
    # Default methods: one of each kind (the paper's regularisers, every new corruption, MIR, dual, the AR data
    # budgets) that runs 3 seeds in about an hour (--methods all: every method).
    "demo": Scale(
        name="demo", unique_tokens=20_000, epochs=30, seq_length=128, global_batch_size=16,
        flags=_cpu_flags(hidden=192, ffn=576),
        evals_per_epoch=1.0, downstream_evals=1, num_examples=100, mc_samples=8,
        default_methods=["ar", "ar_td0.3", "ar_td1.0", "ar_attn0.3", "ar_mlp0.3", "ar_wd0.5", "mdm", "dual",
                         "ar_mir0.3", "ar_td0.3_random", "ar_td0.3_mixed", "ar_td0.3_span3", "ar_td0.5_anneal",
                         "ar_u0.5", "ar_u2", "ar_u4"],
        seconds_per_step=0.2,  # 293 steps in 58 s
    ),
    # The paper's horizon on a CPU: the demo model for 120 epochs (the paper's count), the schedule over the whole
    # run.  The fresh-data references see unique tokens x epochs tokens once, and that must fit in the embedded
    # corpus's training split (~1.56M tokens), so the unique budget is 12,800 tokens (100 windows of 128):
    # 742 steps a run, ~2.5 minutes on 2 cores.  Methods: the paper's grid at its 0.1 rates, the demo grid's
    # strongest corruption (random tokens), dual, weight decay up to 30x the usual, the fresh references (R*)
    # and the AR budgets (effective data).
    "horizon": Scale(
        name="horizon", unique_tokens=12_800, epochs=120, seq_length=128, global_batch_size=16,
        flags=_cpu_flags(hidden=192, ffn=576),
        evals_per_epoch=0.5, downstream_evals=1, num_examples=100, mc_samples=8,
        default_methods=["ar", "ar_td1.0", "mdm", "ar_fresh", "mdm_fresh", "ar_td0.3", "ar_td0.3_random", "dual",
                         "ar_attn0.1", "ar_mlp0.1", "ar_wd0.5", "ar_wd1.0", "ar_wd3.0", "ar_u0.5", "ar_u2", "ar_u4"],
        seconds_per_step=0.2,
    ),
    # The paper: Qwen3-0.6B layout, 3B unique tokens, 120 epochs, global batch 2048 x 4096.
    "paper": Scale(
        name="paper", unique_tokens=3_000_000_000, epochs=120, seq_length=4096, global_batch_size=2048,
        flags=["--model-preset", "qwen3-0.6b", "--seq-length", "4096", "--bf16", "--micro-batch-size", "4",
               "--global-batch-size", "2048", "--split", "99,1,0", "--lr", "3e-4", "--min-lr", "3e-5",
               "--lr-warmup-iters", "1000", "--lr-decay-style", "cosine", "--weight-decay", "0.1",
               "--clip-grad", "1.0", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--eval-iters", "20",
               "--use-distributed-optimizer"],
        evals_per_epoch=1.0, downstream_evals=12, num_examples=500, mc_samples=32,
        default_methods=[*PAPER_METHODS, *BEYOND], distributed=True,
    ),
}
# The quickstart (examples/quickstart.sh): the demo scale's model, budget and schedule for plain AR, AR with the
# demo grid's strongest regulariser (token dropout 0.3, random-token noise) and masked diffusion, one checkpoint
# per run (the last) and no offline tasks: three runs of 292 steps, about 3 minutes on 2 cores.
SCALES["quickstart"] = replace(SCALES["demo"], name="quickstart", downstream_evals=0,
                               default_methods=["ar", "ar_td0.3_random", "mdm"])


def run_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


def run_flags(scale: Scale, method: str, seed: int, run_dir: str, *, unique_tokens=None, epochs=None,
              extra: list[str] = ()) -> tuple[list[str], dict]:
    """(pretrain_diffusion.py flags, facts about the run) for one (method, seed) of the grid."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    u = int(unique_tokens or scale.unique_tokens)
    e = float(epochs or scale.epochs)
    fresh = method in FRESH
    samples = (u - 1) // scale.seq_length
    steps = max(1, round(e * samples / scale.global_batch_size))
    # a fresh-data reference sees as many tokens in one epoch as the grid's runs in e epochs; a budget run
    # F x the unique tokens for e / F epochs (the same steps)
    if fresh:
        data = ["--unique-tokens", str(int(u * e) + 1), "--epochs", "1"]
    elif method in BUDGETS and method != "ar":
        data = ["--unique-tokens", str(int(u * BUDGETS[method]))]
    else:
        data = ["--unique-tokens", str(u), "--epochs", str(e)]
    eval_interval = max(1, round(steps / (e * scale.evals_per_epoch)))
    save_interval = max(1, steps // max(1, scale.downstream_evals))
    flags = [*scale.flags, *METHODS[method], *data, "--train-iters", str(steps), "--seed", str(seed),
             "--eval-interval", str(eval_interval), "--log-interval", str(min(eval_interval, 10)),
             "--run-dir", run_dir, "--save", f"{run_dir}/checkpoints", "--load", f"{run_dir}/checkpoints",
             "--save-interval", str(save_interval), *extra]
    facts = {"method": method, "seed": seed, "unique_tokens": u, "epochs": e, "train_iters": steps,
             "fresh_reference": fresh, "save_interval": save_interval, "budget": BUDGETS.get(method)}
    return flags, facts
