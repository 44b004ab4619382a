"""Training throughput of our Trainer against baselines run in the same invocation (CPU, fp32).

    python benchmarks/bench_training.py                  # both parts, h256 x 4 layers, vocab 32000
    python benchmarks/bench_training.py --parts A --steps 8 --rounds 5
    python benchmarks/bench_training.py --quick          # tiny shape, a smoke check (about a minute)

Part A, same model shape, optimizer (AdamW, decoupled weight decay off norms, grad clip 1.0, constant
lr) and tokens per step in three loops:
  ours                `training.loop.Trainer.train_step` (megatron DDP wrapper, forward-backward
                      schedule, megatron optimizer, data-constrained sampler, objective)
  megatron-core stock megatron-core's own GPTModel as Megatron-LM's pretrain_gpt.py builds it with
                      --transformer-impl local (`get_gpt_layer_local_spec`, RMSNorm, megatron's attention and
                      its own loss, a plain TransformerConfig with the same shape) in a plain loop:
                      forward -> loss.mean() -> backward -> clip -> torch AdamW step -> zero_grad
  megatron-core bare  our `models.builder.build_model` GPTModel (our layer spec, attention backend and loss) in
                      that plain loop: what the trainer adds beyond the model
  HF Llama (sdpa)     `transformers.LlamaForCausalLM` (tied embeddings, no biases) in that plain loop
All three in one process and one thread count, interleaved step by step (order rotated every step) so
that load from other processes hits all of them; the figure is the median over --rounds of each round's
median step time, and the best single step is shown beside it.  Goals: ours / megatron-core bare
>= 0.97 (the trainer costs <= 3%), ours / HF >= 1.15.  The padded vocabulary (NullTokenizer ids + EOD + mask token,
rounded up to 128) is printed; give a --vocab-size that is a multiple of 128 to get exactly it.

Part B, our Trainer at long sequences with `--attention-backend local` (megatron's DotProductAttention,
materialises [batch, heads, seq, seq]) vs `sdpa`: each configuration in its own process, so that the
peak memory is its own: max-RSS growth = peak RSS at the end (VmHWM; ru_maxrss where there is no
/proc) minus the RSS just before the Trainer is built (weights, optimizer state and activations
alike).  Skipped when the flag does not exist.

Both parts say how much of the CPU other processes took while timing (from /proc/stat): on a shared
machine that, not the code, can decide a ratio.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings


import torch
import torch.nn.functional as F

from megatron_dataeff.data.synthetic import null_tokenizer_vocab, write_random_dataset

GOALS = {"megatron-core stock": 0.97, "megatron-core bare": 0.97, "HF Llama (sdpa)": 1.15}
QUICK = dict(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=192, vocab_size=1024, seq_length=64,
             micro_batch_size=4, steps=3, warmup=1, rounds=2, seq_lengths="128,256", long_steps=2)
CHILD_TAG = "BENCH_TRAINING_CHILD "


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shape and few steps (explicit flags still win)")
    p.add_argument("--parts", default="A,B", help="comma-separated: A (trainer vs baselines), B (attention)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (= query groups)")
    p.add_argument("--ffn-hidden-size", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=32000, help="padded vocabulary of every model")
    p.add_argument("--seq-length", type=int, default=256, help="part A")
    p.add_argument("--micro-batch-size", type=int, default=8, help="part A")
    p.add_argument("--steps", type=int, default=4, help="part A: timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="part A: untimed steps of each loop first")
    p.add_argument("--rounds", type=int, default=3, help="part A: round-robin rounds")
    p.add_argument("--seq-lengths", default="1024,2048", help="part B")
    p.add_argument("--long-micro-batch-size", type=int, default=2, help="part B")
    p.add_argument("--long-steps", type=int, default=3, help="part B: timed steps per configuration")
    p.add_argument("--long-warmup", type=int, default=1, help="part B: untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every loop (default: all cores)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        for k, v in QUICK.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    args.threads = args.threads or os.cpu_count()
    return args


def _backend_flag_available() -> bool:
    from megatron_dataeff.arguments import build_parser

    return "--attention-backend" in build_parser().format_help()


def _trainer_argv(a, seq: int, mbs: int, data_prefix: str, run_dir: str, backend=None) -> list[str]:
    argv = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size, "--ffn-hidden-size", a.ffn_hidden_size,
            "--num-attention-heads", a.num_heads, "--num-query-groups", a.num_heads, "--seq-length", seq,
            "--micro-batch-size", mbs, "--train-iters", 1000000, "--lr", 3e-4, "--lr-decay-style", "constant",
            "--weight-decay", 0.1, "--clip-grad", 1.0, "--hidden-dropout", 0, "--attention-dropout", 0,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", null_tokenizer_vocab(a.vocab_size),
            "--data-path", data_prefix, "--eval-iters", 0, "--log-interval", 1000000, "--tensorboard-dir", "",
            "--run-dir", run_dir, "--device", "cpu", "--objective", "ar"]
    if backend is not None:
        argv += ["--attention-backend", backend]
    return [str(x) for x in argv]


def _build_trainer(argv):
    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.training.loop import Trainer

    return Trainer(config_from_args(build_parser().parse_args(argv)))


def _adamw(model, cfg):
    """torch AdamW with megatron's grouping: no weight decay on 1-D parameters (norms, biases)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps), params


def _plain_loop(model, cfg, loss_fn, batches):
    """A step function: forward -> loss -> backward -> clip -> AdamW -> zero_grad, cycling `batches`."""
    opt, params = _adamw(model, cfg)
    model.train()

    def step(i):
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _mcore_loss(model, tokens):
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    b, s = inp.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    return model(inp, position_ids, None, labels=labels).mean()


def _hf_loss(model, tokens):
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    logits = model(input_ids=inp, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _stock_gpt(model_cfg, vocab: int, rotary_base: float):
    """megatron-core's GPTModel with its local layer spec and a plain TransformerConfig of the same shape (what
    Megatron-LM's pretrain_gpt.py builds with --transformer-impl local --normalization RMSNorm --swiglu)."""
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    ours = model_cfg.config
    plain = {f.name: getattr(ours, f.name) for f in dataclasses.fields(TransformerConfig)
             if f.init and hasattr(ours, f.name)}
    plain.update(init_method=None, output_layer_init_method=None)  # derived again from the same std
    config = TransformerConfig(**plain)
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                    max_sequence_length=model_cfg.max_sequence_length, pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
                    position_embedding_type="rope", rotary_base=rotary_base)


def _hf_llama(cfg, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf = LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                     num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                     num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels, hidden_act="silu",
                     max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
                     rope_theta=float(m.rotary_base), initializer_range=m.init_method_std,
                     tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                     use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(hf)


def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds this process and its waited children have)."""
    t = os.times()
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan"), 0.0
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def _others_share(before: tuple[float, float], wall: float) -> float:
    """Fraction of all cores that other processes used since `before` (they slow whatever they overlap)."""
    total, mine = _busy_seconds()
    return max(0.0, (total - before[0]) - (mine - before[1])) / (wall * os.cpu_count())


def _noise_note(share: float) -> str:
    if share != share:  # no /proc/stat
        return ""
    return (f"other processes used {share:.0%} of the {os.cpu_count()} cores while timing"
            + ("; the figures are noisy (the best-step columns suffer least)" if share > 0.1 else ""))


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------
def part_a(a, data_prefix: str, tmp: str, backend_flag: bool) -> dict:
    from megatron_dataeff.models.builder import build_model
    from megatron_dataeff.ops import extension

    argv = _trainer_argv(a, a.seq_length, a.micro_batch_size, data_prefix, f"{tmp}/ours",
                         backend="sdpa" if backend_flag else None)
    trainer = _build_trainer(argv)  # initialises the process group and megatron's parallel state
    cfg = trainer.cfg
    vocab = cfg.model.vocab_rows(trainer.vocab_ids)
    torch.manual_seed(0)
    mcore = build_model(cfg, trainer.vocab_ids, "cpu")
    stock = _stock_gpt(mcore, vocab, cfg.model.rotary_base)
    hf = _hf_llama(cfg, vocab)
    # The same random ids for both plain loops, made before timing (ours reads them from its dataset).
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, trainer.tokenizer.vocab_size, (a.micro_batch_size, a.seq_length + 1),
                             generator=gen) for _ in range(4)]
    loops = {"ours": trainer.train_step, "megatron-core stock": _plain_loop(stock, cfg, _mcore_loss, batches),
             "megatron-core bare": _plain_loop(mcore, cfg, _mcore_loss, batches),
             "HF Llama (sdpa)": _plain_loop(hf, cfg, _hf_loss, batches)}
    n_params = {"ours": trainer.num_parameters,
                "megatron-core stock": sum(p.numel() for p in stock.parameters()),
                "megatron-core bare": sum(p.numel() for p in mcore.parameters()),
                "HF Llama (sdpa)": sum(p.numel() for p in hf.parameters())}
    choice = getattr(trainer.model[0].module, "attention_choice", None)
    torch.set_num_threads(a.threads)  # after every build: nothing may have changed it for one loop only
    counter = {name: 0 for name in loops}

    def run(name):
        start = time.perf_counter()
        loops[name](counter[name])
        counter[name] += 1
        return time.perf_counter() - start

    names = list(loops)
    for _ in range(a.warmup):
        for name in names:
            run(name)
    # One step of each loop in turn (order rotated every cycle): a burst of load from another
    # process lands on all three instead of on whichever loop's block it hit.
    rounds = {name: [] for name in loops}
    steps = {name: [] for name in loops}
    cpu0, wall0 = _busy_seconds(), time.perf_counter()
    for _ in range(a.rounds):
        this = {name: [] for name in loops}
        for k in range(a.steps):
            for name in names[k % len(names):] + names[:k % len(names)]:
                this[name].append(run(name))
        for name in loops:
            rounds[name].append(statistics.median(this[name]))
            steps[name] += this[name]
    noise = _noise_note(_others_share(cpu0, time.perf_counter() - wall0))
    sec = {name: statistics.median(v) for name, v in rounds.items()}
    best = {name: min(v) for name, v in steps.items()}
    tokens = a.micro_batch_size * a.seq_length
    tok_s = {name: tokens / s for name, s in sec.items()}

    print(f"\n## Part A: trainer vs baselines\n\nkernels (masking, SwiGLU dropout): "
          f"{extension.implementation('cpu')}; h{cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
          f"{cfg.model.num_attention_heads} heads ({cfg.model.num_query_groups} query groups), ffn "
          f"{cfg.model.ffn_hidden_size} SwiGLU, padded vocab {vocab}, {a.micro_batch_size} x {a.seq_length} "
          f"tokens/step, fp32, CPU, {torch.get_num_threads()} threads; {a.warmup} warm-up + {a.rounds} rounds x "
          f"{a.steps} steps, the loops interleaved step by step (median of the rounds' median step)"
          + (f"; ours: {choice.describe()}" if choice else "") + "\n")
    if vocab != a.vocab_size:
        print(f"note: padded vocabulary is {vocab}, not the requested {a.vocab_size}\n")
    rows = []
    for name in loops:
        ratio = tok_s["ours"] / tok_s[name]
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"{'PASS' if ratio >= goal else 'FAIL'} (goal >= {goal})"
        rows.append([name, f"{n_params[name] / 1e6:.2f}M", f"{sec[name] * 1000:.0f}", f"{tok_s[name]:,.0f}",
                     f"{ratio:.3f}", verdict, f"{best[name] * 1000:.0f}", f"{best[name] / best['ours']:.3f}"])
    _table(["loop", "params", "ms/step", "tokens/s", "ours / this", "goal", "best ms", "ours / this (best)"],
           rows)
    spread = {n: f"{min(v) * 1000:.0f}-{max(v) * 1000:.0f}" for n, v in rounds.items()}
    print(f"\nround medians, ms/step (min-max): {', '.join(f'{n} {s}' for n, s in spread.items())}")
    if noise:
        print(noise)
    trainer.close()
    return {"padded_vocab": vocab, "ms_per_step": {n: s * 1000 for n, s in sec.items()}, "tokens_per_s": tok_s,
            "ours_over": {n: tok_s["ours"] / tok_s[n] for n in GOALS},
            "ours_over_best_step": {n: best[n] / best["ours"] for n in GOALS},
            "pass": {n: tok_s["ours"] / tok_s[n] >= g for n, g in GOALS.items()}}


def _status_kib(field: str) -> int:
    """A /proc/self/status figure (VmRSS: now, VmHWM: peak of this address space), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_rss_kib() -> int:
    """Peak RSS of this process.  ru_maxrss alone is not it: Linux carries the parent's RSS over fork +
    exec into it (a child of a parent holding 1.5 GB starts at 1.5 GB); VmHWM belongs to this exec."""
    try:
        return _status_kib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(spec: dict) -> None:
    """One Part-B configuration: build, warm up, time; prints one JSON line."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    torch.set_num_threads(spec["threads"])
    # Imports and the process group are not the trainer's memory: both come before the baseline
    # (the Trainer's own `initialize` then finds the group up and only seeds).
    import megatron.core.distributed  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    from megatron_dataeff import distributed
    from megatron_dataeff.training import loop  # noqa: F401

    distributed.initialize(1, 1, 0, "cpu")
    try:
        before = _status_kib("VmRSS")
    except (OSError, KeyError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer = _build_trainer(spec["argv"])
    torch.set_num_threads(spec["threads"])
    for i in range(spec["warmup"]):
        trainer.train_step(i)
    times = []
    cpu0, wall0 = _busy_seconds(), time.perf_counter()
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        trainer.train_step(i)
        times.append(time.perf_counter() - start)
    others = _others_share(cpu0, time.perf_counter() - wall0)
    peak = _peak_rss_kib()
    trainer.close()
    print(CHILD_TAG + json.dumps({"sec_per_step": statistics.median(times), "best_sec": min(times),
                                  "rss_growth_mib": (peak - before) / 1024, "others_cpu": others}))


def part_b(a, data_prefix: str, tmp: str, backend_flag: bool) -> dict:
    print("\n## Part B: attention backends at long sequences\n")
    if not backend_flag:
        print("skipped: --attention-backend not available")
        return {"skipped": True}
    seqs = [int(s) for s in a.seq_lengths.split(",") if s]
    mbs = a.long_micro_batch_size
    # Part A's process group set these; a child must start its own group, not join that one.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = {}
    for seq in seqs:
        for backend in ("local", "sdpa"):
            spec = {"argv": _trainer_argv(a, seq, mbs, data_prefix, f"{tmp}/{backend}{seq}", backend=backend),
                    "warmup": a.long_warmup, "steps": a.long_steps, "threads": a.threads}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)), None)
            if proc.returncode != 0 or line is None:
                print(f"{backend} seq {seq}: child failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                res[(seq, backend)] = None
                continue
            out = json.loads(line[len(CHILD_TAG):])
            out["tokens_per_s"] = mbs * seq / out["sec_per_step"]
            res[(seq, backend)] = out
    print(f"h{a.hidden_size}, {a.num_layers} layers, {a.num_heads} heads, ffn {a.ffn_hidden_size}, vocab "
          f"{a.vocab_size}, micro-batch {mbs}, fp32, CPU, {a.threads} threads; each configuration in its own "
          f"process, {a.long_warmup} warm-up + {a.long_steps} timed steps (median). Memory: max-RSS growth, peak RSS "
          f"(VmHWM) over the RSS before the Trainer is built, weights and optimizer state included.\n")
    rows, summary = [], {}
    for seq in seqs:
        loc, sd = res.get((seq, "local")), res.get((seq, "sdpa"))
        for backend, r in (("local", loc), ("sdpa", sd)):
            if r is None:
                rows.append([seq, backend, "failed"] + [""] * 6)
                continue
            both = loc is not None and sd is not None
            rows.append([seq, backend, f"{r['sec_per_step'] * 1000:.0f}", f"{r['best_sec'] * 1000:.0f}",
                         f"{r['tokens_per_s']:,.0f}", f"{r['rss_growth_mib']:,.0f}",
                         f"{r['tokens_per_s'] / loc['tokens_per_s']:.2f}" if both else "",
                         f"{r['rss_growth_mib'] / loc['rss_growth_mib']:.2f}" if both else "",
                         f"{r['others_cpu']:.0%}"])
        if loc is not None and sd is not None:
            summary[seq] = {"local": loc, "sdpa": sd,
                            "speedup_sdpa_over_local": sd["tokens_per_s"] / loc["tokens_per_s"],
                            "memory_sdpa_over_local": sd["rss_growth_mib"] / loc["rss_growth_mib"]}
    _table(["seq", "backend", "ms/step", "best ms", "tokens/s", "max-RSS growth MiB", "tokens/s vs local",
            "memory vs local", "others' CPU"], rows)
    print("\nothers' CPU: share of the cores other processes used during that row's timed steps (over 10%: noisy)")
    return {str(k): v for k, v in summary.items()}


def main() -> None:
    a = _parse_args()
    if a.child is not None:
        child(json.loads(a.child))
        return
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    torch.set_num_threads(a.threads)
    parts = {p.strip().upper() for p in a.parts.split(",") if p.strip()}
    backend_flag = _backend_flag_available()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        data_prefix = write_random_dataset(f"{tmp}/random_text_document", null_tokenizer_vocab(a.vocab_size))
        if "A" in parts:
            figures["A"] = part_a(a, data_prefix, tmp, backend_flag)
        if "B" in parts:  # children of their own: this process's models do not count in their memory
            figures["B"] = part_b(a, data_prefix, tmp, backend_flag)
    if a.json:
        print(json.dumps(figures))
    from megatron_dataeff.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
