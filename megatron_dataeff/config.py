"""Typed run configuration and the command line that fills it (Megatron-LM's flag names).

Every section is a dataclass validated in `__post_init__`; `RunConfig.validate_layout(world_size)`
adds the checks that need the number of processes.  A config that cannot work fails before
anything is built, with a message naming the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_dataeff.models.presets import PRESETS
from megatron_dataeff.training.exits import EXIT_SIGNALS


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the flags."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Shape and regularisers of the GPT model (megatron-core GPTModel)."""

    num_layers: int = 4  # transformer layers
    hidden_size: int = 128  # model width
    ffn_hidden_size: int = 384  # SwiGLU inner width
    num_attention_heads: int = 4  # query heads
    num_query_groups: Optional[int] = None  # key/value heads (GQA); None = num_attention_heads
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    qk_layernorm: bool = False  # RMSNorm on queries and keys (Qwen3)
    seq_length: int = 128  # tokens per sample
    max_position_embeddings: Optional[int] = None  # None = seq_length
    rotary_base: int = 10000  # RoPE base
    norm_epsilon: float = 1e-5  # RMSNorm epsilon
    init_method_std: float = 0.02  # weight init std
    untie_embeddings_and_output_weights: bool = False  # separate output layer
    make_vocab_size_divisible_by: int = 128  # vocab padding (independent of TP, so checkpoints reshard)
    hidden_dropout: float = 0.0  # dropout on the residual branches
    attention_dropout: float = 0.0  # dropout on attention probabilities
    mlp_dropout: float = 0.0  # dropout on the MLP's inner activation (input of linear_fc2)

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                     f"{self.num_attention_heads}; give --kv-channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "seq_length", "make_vocab_size_divisible_by"):
            _require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                 f"--num-query-groups {self.num_query_groups}")
        _require(self.max_position_embeddings >= self.seq_length,
                 "--max-position-embeddings must be >= --seq-length")
        for name in ("hidden_dropout", "attention_dropout", "mlp_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"--{name.replace('_', '-')} must be in [0, 1)")


@dataclass
class ObjectiveConfig:
    """What the model learns: AR, AR with token dropout, or masked diffusion."""

    objective: str = "ar"  # ar | mdm
    token_dropout_rate: float = 0.0  # ar: replace input tokens by the mask token with this rate
    token_dropout_schedule: str = "fixed"  # fixed: rate R; uniform: per-sequence r ~ U(0, R)
    mdm_eps: float = 1e-3  # mdm: p = (1 - eps) t + eps
    mdm_stratified: bool = False  # mdm: stratify t over the global batch (antithetic-style)

    def __post_init__(self):
        _require(self.objective in ("ar", "mdm"), f"--objective must be ar or mdm, got {self.objective!r}")
        _require(self.token_dropout_schedule in ("fixed", "uniform"),
                 "--token-dropout-schedule must be fixed or uniform")
        _require(0.0 <= self.token_dropout_rate <= 1.0, "--token-dropout-rate must be in [0, 1]")
        _require(0.0 <= self.mdm_eps < 1.0, "--mdm-eps must be in [0, 1)")
        _require(not (self.objective == "mdm" and self.token_dropout_rate > 0),
                 "--token-dropout-rate applies to --objective ar; mdm masks by its own schedule")

    @property
    def bidirectional(self) -> bool:
        """Masked diffusion attends both ways; AR is causal."""
        return self.objective == "mdm"


ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local", "sdpa")
AUTO_CHUNK_BYTES = 256 * 2**20  # fp32 bytes of one chunk of the chunked loss when its size is automatic


def auto_chunk_tokens(vocab_per_rank: int) -> int:
    """Tokens per chunk of the chunked loss (`--cross-entropy-chunk-size` not given): one chunk's fp32
    logits [tokens, vocab / TP] take at most AUTO_CHUNK_BYTES."""
    return max(1, AUTO_CHUNK_BYTES // (4 * vocab_per_rank))
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")


@dataclass
class ComputeConfig:
    """How the model is computed: kernels, recomputation, the loss. Changes speed and memory, not the
    model (a checkpoint written under one setting loads under any other)."""

    attention_backend: str = "auto"  # see models/attention.py for the mapping
    transformer_impl: str = "transformer_engine"  # transformer_engine: TE layers when importable; local: never
    recompute_granularity: Optional[str] = None  # full | selective (None: keep all activations)
    recompute_method: Optional[str] = None  # full: uniform | block
    recompute_num_layers: Optional[int] = None  # full: layers per recompute unit (uniform) or per stage (block)
    recompute_modules: Optional[list] = None  # selective: core_attn | mlp | layernorm (default core_attn)
    cross_entropy_loss_fusion: bool = False  # megatron-core's fused vocab-parallel cross entropy
    cross_entropy_fusion_impl: str = "native"  # native | te
    cross_entropy_chunk_size: Optional[int] = None  # tokens per loss chunk; None = auto, 0 = unchunked
    bias_swiglu_fusion: bool = True  # GPU: fused SwiGLU (megatron's jit fuser)
    bias_dropout_fusion: bool = True  # GPU: fused residual dropout-add
    masked_softmax_fusion: bool = True  # GPU, local attention: fused softmax when its kernel is importable
    rope_fusion: bool = True  # GPU with transformer-engine: fused RoPE
    gradient_accumulation_fusion: bool = True  # GPU with transformer-engine: wgrad into main_grad
    use_cpu_initialization: bool = False  # GPU: initialise weights on the CPU (the CPU run's exact weights)

    def __post_init__(self):
        _require(self.transformer_impl in ("transformer_engine", "local"),
                 f"--transformer-impl must be transformer_engine or local, got {self.transformer_impl!r}")
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        g = self.recompute_granularity
        _require(g in (None, "full", "selective"),
                 f"--recompute-granularity must be full or selective, got {g!r}")
        _require(self.recompute_method in (None, "uniform", "block"),
                 f"--recompute-method must be uniform or block, got {self.recompute_method!r}")
        if g == "full":
            _require(self.recompute_method is not None,
                     "--recompute-granularity full needs --recompute-method uniform or block")
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1
            _require(self.recompute_num_layers >= 1, "--recompute-num-layers must be >= 1")
        else:
            _require(self.recompute_method is None and self.recompute_num_layers is None,
                     "--recompute-method and --recompute-num-layers need --recompute-granularity full")
        if self.recompute_modules is not None:
            self.recompute_modules = list(self.recompute_modules)
            _require(g == "selective", "--recompute-modules needs --recompute-granularity selective")
            bad = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
            _require(not bad and self.recompute_modules,
                     f"--recompute-modules takes {', '.join(RECOMPUTE_MODULES)}, got {self.recompute_modules}")
        _require(self.cross_entropy_fusion_impl in ("native", "te"),
                 f"--cross-entropy-fusion-impl must be native or te, got {self.cross_entropy_fusion_impl!r}")
        _require(self.cross_entropy_chunk_size is None or self.cross_entropy_chunk_size >= 0,
                 "--cross-entropy-chunk-size must be >= 0 (0: one unchunked loss)")


@dataclass
class DataConfig:
    """Where tokens come from and how the data-constrained training set is drawn."""

    data_path: list = field(default_factory=list)  # [weight] prefix ...; empty = embedded corpus
    split: str = "98,2,0"  # train,valid,test weights over documents
    tokenizer_type: Optional[str] = None  # see data/tokenizers.py; None: GPT2BPETokenizer with --vocab-file/--merge-file, else ByteTokenizer
    tokenizer_model: Optional[str] = None  # tokenizer file or directory
    vocab_file: Optional[str] = None  # GPT2BPETokenizer vocab.json
    merge_file: Optional[str] = None  # GPT2BPETokenizer merges.txt
    vocab_size: Optional[int] = None  # NullTokenizer vocabulary size
    unique_tokens: Optional[int] = None  # train on a fixed subset of this many tokens
    epochs: Optional[float] = None  # passes over the training set (sets --train-iters)
    data_cache_dir: Optional[str] = None  # where the embedded corpus is cached

    def __post_init__(self):
        from megatron_dataeff.data.tokenizers import TOKENIZER_TYPES

        if self.tokenizer_type is None:  # Megatron-LM: a vocab/merge pair means GPT-2 BPE
            self.tokenizer_type = "GPT2BPETokenizer" if (self.vocab_file or self.merge_file) else "ByteTokenizer"
        _require(self.tokenizer_type in TOKENIZER_TYPES,
                 f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got {self.tokenizer_type!r}")
        try:
            weights = [float(x) for x in self.split.replace("/", ",").split(",")]
        except ValueError as exc:
            raise ConfigError(f"--split must be comma-separated numbers, got {self.split!r}") from exc
        _require(len(weights) in (1, 2, 3) and all(w >= 0 for w in weights) and sum(weights) > 0,
                 f"--split must be up to 3 non-negative weights, got {self.split!r}")
        _require(self.unique_tokens is None or self.unique_tokens > 0, "--unique-tokens must be positive")
        _require(self.epochs is None or self.epochs > 0, "--epochs must be positive")

    @property
    def split_weights(self) -> list[float]:
        """Normalised (train, valid, test) fractions."""
        w = [float(x) for x in self.split.replace("/", ",").split(",")]
        w = (w + [0.0, 0.0])[:3]
        return [x / sum(w) for x in w]


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class OptimConfig:
    """Optimizer, schedule and batch."""

    micro_batch_size: int = 4  # samples per forward pass per data-parallel rank
    global_batch_size: Optional[int] = None  # samples per optimizer step; None = micro x DP
    train_iters: Optional[int] = None  # optimizer steps (or set --epochs / --train-samples)
    train_samples: Optional[int] = None  # samples to train on: train_iters = this // global batch; schedule in samples
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # final learning rate
    lr_warmup_iters: int = 0  # linear warmup steps
    lr_warmup_fraction: Optional[float] = None  # warmup as a fraction of the decay length
    lr_warmup_samples: int = 0  # --train-samples: linear warmup samples
    lr_decay_samples: Optional[int] = None  # --train-samples: decay length in samples (None = train_samples)
    lr_wsd_decay_samples: Optional[int] = None  # --train-samples, WSD: samples of the final decay
    lr_decay_style: str = "cosine"  # constant | linear | cosine | WSD
    lr_decay_iters: Optional[int] = None  # None = train_iters
    lr_wsd_decay_iters: Optional[int] = None  # WSD: steps of the final decay (default 10% of decay)
    lr_wsd_decay_style: str = "linear"  # WSD decay shape
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    clip_grad: float = 1.0  # global grad-norm clip (0 = off)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 1234  # weights, data order and all noise
    bf16: bool = False  # bf16 parameters with fp32 master weights
    skip_nonfinite_steps: bool = False  # skip steps whose loss is NaN/inf instead of stopping

    def __post_init__(self):
        _require(self.micro_batch_size > 0, "--micro-batch-size must be positive")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "need 0 <= --min-lr <= --lr and --lr > 0")
        _require(self.lr_decay_style in LR_DECAY_STYLES,
                 f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)}, got {self.lr_decay_style!r}")
        _require(self.lr_wsd_decay_style in LR_WSD_DECAY_STYLES,
                 f"--lr-wsd-decay-style must be one of {', '.join(LR_WSD_DECAY_STYLES)}, got {self.lr_wsd_decay_style!r}")
        _require(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0")
        _require(0 <= self.seed < 2**63, "--seed must be in [0, 2**63)")
        _require(self.train_iters is None or self.train_iters > 0, "--train-iters must be positive")
        _require(self.train_samples is None or self.train_samples > 0, "--train-samples must be positive")
        _require(self.train_samples is None or self.train_iters is None,
                 "give --train-iters or --train-samples, not both")
        if self.train_samples is None:
            _require(not self.lr_warmup_samples and self.lr_decay_samples is None and self.lr_wsd_decay_samples is None,
                     "--lr-warmup-samples, --lr-decay-samples and --lr-wsd-decay-samples need --train-samples "
                     "(with --train-iters use the *-iters flags)")
        else:
            _require(not self.lr_warmup_iters and self.lr_decay_iters is None and self.lr_wsd_decay_iters is None,
                     "--lr-warmup-iters, --lr-decay-iters and --lr-wsd-decay-iters need --train-iters (with "
                     "--train-samples use the *-samples flags)")
        _require(self.lr_warmup_fraction is None or 0.0 <= self.lr_warmup_fraction < 1.0,
                 "--lr-warmup-fraction must be in [0, 1)")
        _require(self.lr_warmup_fraction is None or not (self.lr_warmup_iters or self.lr_warmup_samples),
                 "--lr-warmup-fraction excludes --lr-warmup-iters / --lr-warmup-samples")


@dataclass
class ParallelConfig:
    """How the model and batch are split over processes."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    sequence_parallel: bool = False  # shard norms, dropout and residuals along the sequence over TP ranks
    overlap_grad_reduce: bool = False  # GPU: reduce gradient buckets during the backward pass
    overlap_param_gather: bool = False  # GPU, distributed optimizer: gather updated params during forward
    grad_reduce_in_bf16: bool = False  # reduce gradients in bf16 instead of fp32
    ddp_bucket_size: Optional[int] = None  # parameters per gradient bucket (None: megatron's default)
    device: str = "auto"  # auto | cuda | cpu
    distributed_timeout_minutes: int = 30  # collective timeout (a rank waiting longer fails)

    def __post_init__(self):
        _require(self.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be positive")
        _require(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        _require(self.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1")
        _require(self.device in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu")
        _require(not self.overlap_param_gather or self.use_distributed_optimizer,
                 "--overlap-param-gather needs --use-distributed-optimizer")
        _require(self.ddp_bucket_size is None or self.ddp_bucket_size > 0, "--ddp-bucket-size must be positive")


@dataclass
class LoggingConfig:
    """What is reported, where and how often."""

    log_interval: int = 10  # steps between train log lines
    eval_interval: int = 100  # steps between validation runs (0 = only at the end)
    eval_iters: int = 10  # validation batches per evaluation
    run_dir: str = "runs/default"  # everything a run writes, unless given elsewhere
    log_dir: Optional[str] = None  # metrics.jsonl; None = run_dir
    tensorboard_dir: Optional[str] = None  # None = run_dir/tensorboard; "" disables
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None = from the device name

    def __post_init__(self):
        _require(self.log_interval > 0, "--log-interval must be positive")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be positive")
        _require(self.eval_interval >= 0 and self.eval_iters >= 0, "--eval-interval/--eval-iters must be >= 0")
        if self.log_dir is None:
            self.log_dir = self.run_dir
        if self.tensorboard_dir is None:
            self.tensorboard_dir = f"{self.run_dir}/tensorboard"


@dataclass
class CheckpointConfig:
    """Saving, resuming and exiting early."""

    save: Optional[str] = None  # directory for checkpoints
    load: Optional[str] = None  # directory to resume from
    save_interval: Optional[int] = None  # steps between checkpoints
    keep_last: Optional[int] = None  # keep only the newest K checkpoints
    finetune: bool = False  # --load the weights only: iteration 0, fresh optimizer and schedule
    use_checkpoint_args: bool = False  # take the model shape and tokenizer from the --load checkpoint
    override_opt_param_scheduler: bool = False  # resume with this command line's schedule (extend a run)
    use_checkpoint_opt_param_scheduler: bool = False  # resume with the checkpoint's schedule
    exit_signal_handler: bool = False  # on --exit-signal: save at the next step boundary, exit 0
    exit_signal: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # signals the handler catches
    exit_duration_in_mins: Optional[float] = None  # save and exit once this many minutes have passed
    exit_interval: Optional[int] = None  # save and exit after every iteration divisible by this
    ckpt_format: str = "torch_dist"  # megatron-core dist_checkpointing, the only format written

    def __post_init__(self):
        _require(self.ckpt_format == "torch_dist",
                 f"--ckpt-format {self.ckpt_format}: checkpoints are megatron-core torch_dist (resharding across "
                 f"TP/PP/DP); other formats are not written")
        _require(self.save_interval is None or self.save_interval > 0, "--save-interval must be positive")
        _require(self.keep_last is None or self.keep_last > 0, "--keep-last must be positive")
        _require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                 "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
        self.exit_signal = list(self.exit_signal)
        bad = [s for s in self.exit_signal if s not in EXIT_SIGNALS]
        _require(self.exit_signal and not bad,
                 f"--exit-signal takes {', '.join(EXIT_SIGNALS)}, got {self.exit_signal}")
        _require(self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0,
                 "--exit-duration-in-mins must be positive")
        _require(self.exit_interval is None or self.exit_interval > 0, "--exit-interval must be positive")


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate_layout(self, world_size: int) -> int:
        """Checks that need the process count or span sections; returns the data-parallel size."""
        m, p, o = self.model, self.parallel, self.optim
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _require(world_size % (tp * pp) == 0,
                 f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                 f"--pipeline-model-parallel-size {pp}")
        _require(m.num_attention_heads % tp == 0,
                 f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                 f"{m.num_attention_heads}")
        _require(m.num_query_groups % tp == 0,
                 f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {m.num_query_groups}")
        _require(m.ffn_hidden_size % tp == 0,
                 f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {m.ffn_hidden_size}")
        _require(m.num_layers % pp == 0,
                 f"--pipeline-model-parallel-size {pp} does not divide --num-layers {m.num_layers}")
        _require(m.make_vocab_size_divisible_by % tp == 0,
                 f"--tensor-model-parallel-size {tp} does not divide --make-vocab-size-divisible-by "
                 f"{m.make_vocab_size_divisible_by}")
        if tp == 1:
            p.sequence_parallel = False  # nothing to split (Megatron-LM turns it off too)
        if p.sequence_parallel:
            _require(m.seq_length % tp == 0,
                     f"--sequence-parallel: --tensor-model-parallel-size {tp} does not divide --seq-length "
                     f"{m.seq_length}")
        c = self.compute
        _require(not c.cross_entropy_loss_fusion or o.bf16,
                 "--cross-entropy-loss-fusion: megatron-core's fused cross entropy returns bf16 gradients; "
                 "use it with --bf16 (the default chunked loss keeps fp32 gradients)")
        if c.recompute_granularity == "full":
            per_stage = m.num_layers // pp
            _require(c.recompute_num_layers <= per_stage,
                     f"--recompute-num-layers {c.recompute_num_layers} exceeds the {per_stage} layers of a "
                     f"pipeline stage")
            # megatron-core's uniform recomputation walks the stage in units of N layers (an IndexError
            # inside TransformerBlock otherwise)
            _require(c.recompute_method != "uniform" or per_stage % c.recompute_num_layers == 0,
                     f"--recompute-method uniform: --recompute-num-layers {c.recompute_num_layers} does not divide "
                     f"the {per_stage} layers of a pipeline stage")
        dp = world_size // (tp * pp)
        if o.global_batch_size is None:
            o.global_batch_size = o.micro_batch_size * dp
        _require(o.global_batch_size % (o.micro_batch_size * dp) == 0,
                 f"--global-batch-size {o.global_batch_size} is not divisible by --micro-batch-size "
                 f"{o.micro_batch_size} x data-parallel size {dp}")
        _require(o.train_samples is None or self.data.epochs is None, "give --train-samples or --epochs, not both")
        _require(o.train_samples is None or o.train_samples >= o.global_batch_size,
                 f"--train-samples {o.train_samples} is less than one global batch ({o.global_batch_size})")
        return dp

    def adopt_checkpoint_args(self, meta: dict) -> None:
        """Model shape and tokenizer from a checkpoint's metadata (`--use-checkpoint-args`); the
        regularisers (dropouts) stay as given."""
        saved = meta.get("config", {})
        keep = {"hidden_dropout", "attention_dropout", "mlp_dropout", "seq_length"}
        model = {k: v for k, v in saved.get("model", {}).items() if k not in keep}
        for k, v in model.items():
            if hasattr(self.model, k):
                setattr(self.model, k, v)
        if self.model.max_position_embeddings < self.model.seq_length:
            self.model.max_position_embeddings = self.model.seq_length
        self.model.__post_init__()
        tok = meta.get("tokenizer", {})
        build = tok.get("build_args", {})
        self.data.tokenizer_type = build.get("tokenizer_type", tok.get("tokenizer_type", self.data.tokenizer_type))
        for key in ("tokenizer_model", "vocab_file", "merge_file", "vocab_size"):
            if key in build:
                setattr(self.data, key, build[key])
        if "tokenizer_model" not in build and tok.get("tokenizer_model"):
            self.data.tokenizer_model = tok["tokenizer_model"]

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per data-parallel rank per step."""
        return self.optim.global_batch_size // (self.optim.micro_batch_size * dp)

    def to_dict(self) -> dict:
        """Plain-dict form, for run records and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Inverse of `to_dict` (keys a section no longer has are ignored)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory
            known = {g.name for g in dataclasses.fields(section_cls)}
            kwargs[f.name] = section_cls(**{k: v for k, v in d.get(f.name, {}).items() if k in known})
        return cls(**kwargs)


def padded_vocab_size(num_ids: int, divisible_by: int) -> int:
    """Vocabulary rows of the model: num_ids rounded up (independent of TP, so layouts agree)."""
    return int(math.ceil(num_ids / divisible_by) * divisible_by)


# ----------------------------------------------------------------------------------------------
# Command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The pretrain_diffusion.py command line (Megatron-LM's names where they exist)."""
    p = argparse.ArgumentParser(
        prog="pretrain_diffusion.py",
        description="Train AR, token-dropout and masked-diffusion GPT models on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(PRESETS), default="tiny",
                   help="fills the shape flags; explicit flags override it")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "seq_length", "max_position_embeddings", "rotary_base"):
        g.add_argument(_flag(name), type=int, default=None)
    g.add_argument("--qk-layernorm", action="store_true", default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--norm-epsilon", type=float, default=None)
    g.add_argument("--init-method-std", type=float, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g = p.add_argument_group("compute (speed and memory; the model is the same under every choice)")
    g.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                   help="auto: transformer-engine on a GPU when importable, else sdpa (torch's "
                        "scaled_dot_product_attention: FlashAttention / memory-efficient kernels). flash, fused, "
                        "unfused: that transformer-engine kernel; without TE flash = sdpa's flash kernel, fused = "
                        "sdpa's cuDNN / memory-efficient kernels (GPU only), unfused = local. local: megatron-core's "
                        "DotProductAttention (materialises [batch, heads, seq, seq]). Attention-dropout masks are "
                        "drawn by the kernel, per tensor-parallel rank, in every backend: not keyed per sample, so "
                        "unlike token dropout and MLP dropout they differ between TP layouts")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recomputation (megatron-core): full = whole layers, selective = "
                        "--recompute-modules")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full: uniform = every layer in units of --recompute-num-layers; block = the first "
                        "--recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="full recomputation: see --recompute-method")
    g.add_argument("--recompute-modules", nargs="+", default=None, choices=list(RECOMPUTE_MODULES),
                   help="selective recomputation: which parts of each layer (default core_attn)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused vocab-parallel cross entropy (bf16 gradients: needs --bf16)")
    g.add_argument("--cross-entropy-fusion-impl", choices=["native", "te"], default="native",
                   help="with --cross-entropy-loss-fusion: megatron's native kernel or transformer-engine's")
    g.add_argument("--cross-entropy-chunk-size", type=int, default=None,
                   help="the loss in chunks of this many tokens, recomputing each chunk's softmax in backward "
                        "so that no fp32 copy of the logits is kept (default: chunks of <= 256 MiB in fp32; 0: "
                        "megatron-core's unchunked loss)")
    for name, what in (("bias-swiglu", "SwiGLU"), ("bias-dropout", "residual dropout-add"),
                       ("masked-softmax", "local attention's softmax"), ("rope", "RoPE (transformer-engine)"),
                       ("gradient-accumulation", "weight-gradient accumulation (transformer-engine)")):
        g.add_argument(f"--no-{name}-fusion", dest=f"{name.replace('-', '_')}_fusion", action="store_false",
                       help=f"GPU: do not fuse the {what}")
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine",
                   help="transformer_engine: transformer-engine's layers when TE is importable on a GPU (otherwise "
                        "megatron-core's local layers, said at start-up); local: never TE")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="GPU: initialise the weights on the CPU from the CPU generator, as a CPU run does (the "
                        "same start on both; CPU runs always do this)")
    g = p.add_argument_group("regularisation")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--mlp-dropout", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=["ar", "mdm"], default="ar")
    g.add_argument("--token-dropout-rate", type=float, default=0.0)
    g.add_argument("--token-dropout-schedule", choices=["fixed", "uniform"], default="fixed")
    g.add_argument("--mdm-eps", type=float, default=1e-3)
    g.add_argument("--mdm-stratified", action="store_true", help="stratify t over each global batch")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[], help="[weight] prefix ...; none = embedded corpus")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--tokenizer-type", default=None,
                   help="default: GPT2BPETokenizer when --vocab-file/--merge-file are given (as Megatron-LM), "
                        "else ByteTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--unique-tokens", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--data-cache-dir", default=None)
    g = p.add_argument_group("optimization")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=list(LR_DECAY_STYLES), default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", choices=list(LR_WSD_DECAY_STYLES), default="linear")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples instead of --train-iters: iterations = samples // "
                        "--global-batch-size, and the schedule counts samples (Megatron-LM)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup length as a fraction of the decay length (--lr-decay-iters/-samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="--train-samples: warmup in samples")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="--train-samples: decay length in samples (default --train-samples)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="--train-samples, WSD: samples of the final decay (default 10%% of the decay)")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 parameters with fp32 master weights")
    g.add_argument("--skip-nonfinite-steps", action="store_true",
                   help="skip a step whose loss is NaN/inf instead of stopping the run")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with TP > 1, split norms, dropouts and residuals along the sequence (ignored at TP 1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="GPU: reduce gradient buckets while the backward pass runs")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="GPU, with --use-distributed-optimizer: all-gather updated parameters during the forward")
    g.add_argument("--grad-reduce-in-bf16", action="store_true", help="reduce gradients in bf16 (default fp32)")
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="parameters per gradient-reduction bucket")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30,
                   help="timeout of collectives: a rank waiting longer fails instead of hanging")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--run-dir", default="runs/default")
    g.add_argument("--log-dir", default=None)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default from the GPU name: H100/H200 bf16 989, "
                        "A100 312; none on CPUs)")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights of --load and start at iteration 0 with a fresh optimizer")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape and tokenizer from the --load checkpoint (e.g. one made by "
                        "tools/import_hf.py) instead of the flags")
    g.add_argument("--ckpt-format", default="torch_dist",
                   help="torch_dist only (megatron-core dist_checkpointing; loads at any TP/PP/DP layout)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="resuming: use this command line's schedule (iterations, lr, min-lr, warmup, decay, "
                        "weight decay) where it differs from the checkpoint's, e.g. to extend a run with a larger "
                        "--train-iters. Without this or --use-checkpoint-opt-param-scheduler a difference is an "
                        "error naming both values")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="resuming: keep the checkpoint's schedule whatever the command line says")
    g = p.add_argument_group("exiting early (each saves a checkpoint to --save and exits 0; resume with --load)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="catch --exit-signal: finish the step in flight, agree over all ranks, save, exit 0")
    g.add_argument("--exit-signal", nargs="+", default=["SIGTERM", "SIGUSR1"], choices=list(EXIT_SIGNALS),
                   help="signals --exit-signal-handler catches (SIGTERM: preemption; SIGUSR1: what SLURM's "
                        "--signal=USR1@SECONDS sends before the time limit)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once this many minutes have passed since the trainer started")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit after the first iteration divisible by this")
    _add_megatron_descriptive_flags(p)
    return p


# Megatron-LM flags that describe the one model family built here (dense GPT, RMSNorm, SwiGLU, RoPE, no
# biases, per-token loss): accepted where they say what is built, refused by name where they ask for
# something else.  (flag, argparse kind, accepted values or None for a switch, what is built instead)
_ALWAYS = "always so here"
MEGATRON_DESCRIPTIVE = (
    ("--use-mcore-models", "on", None, _ALWAYS),
    ("--swiglu", "on", None, "the MLP is always SwiGLU"),
    ("--disable-bias-linear", "on", None, "linear layers never have biases"),
    ("--group-query-attention", "on", None, "--num-query-groups sets the key/value heads"),
    ("--log-throughput", "on", None, "every train record has tokens/s, TFLOP/s and MFU"),
    ("--calculate-per-token-loss", "on", None, "the loss is always a mean over the global batch's tokens"),
    ("--attention-softmax-in-fp32", "on", None, "attention softmax accumulates in fp32"),
    ("--no-position-embedding", "on", None, "no learned position embedding: RoPE"),
    ("--fp16", "off", None, "fp16 with loss scaling is not supported: use --bf16"),
    ("--apply-layernorm-1p", "off", None, "norms are plain RMSNorm"),
    ("--normalization", "value", ("RMSNorm",), "norms are RMSNorm"),
    ("--position-embedding-type", "value", ("rope",), "positions are RoPE"),
    ("--rotary-percent", "value", (1.0,), "RoPE covers the whole head dimension"),
    ("--context-parallel-size", "value", (1,), "context parallelism is not supported (TP, PP, DP, SP are)"),
    ("--distributed-backend", "value", ("nccl", "gloo"), "NCCL on GPUs, gloo on CPUs"),
    ("--rampup-batch-size", "value", (), "batch-size ramp-up is not supported: the global batch is fixed"),
    ("--num-layers-per-virtual-pipeline-stage", "value", (), "interleaved pipeline schedules are not supported"),
)


def _add_megatron_descriptive_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Megatron-LM flags that describe what is built (accepted as they are; refused "
                             "where they ask for something else)")
    for flag, kind, allowed, what in MEGATRON_DESCRIPTIVE:
        dest = "megatron_" + flag[2:].replace("-", "_")
        if kind in ("on", "off"):
            help_ = f"accepted: {what}" if kind == "on" else f"refused: {what}"
            g.add_argument(flag, dest=dest, action="store_true", help=help_)
        else:
            typ = type(allowed[0]) if allowed else str
            nargs = "+" if flag == "--rampup-batch-size" else None
            shown = ", ".join(str(a) for a in allowed) or "nothing"
            g.add_argument(flag, dest=dest, type=typ, nargs=nargs, default=None,
                           help=f"accepts {shown}: {what}")
    g.add_argument("--use-flash-attn", dest="megatron_use_flash_attn", action="store_true",
                   help="Megatron-LM's older spelling of --attention-backend flash")


def check_megatron_descriptive_flags(args: argparse.Namespace) -> None:
    """Refuse, by name, a Megatron-LM flag that asks for something this framework does not build."""
    for flag, kind, allowed, what in MEGATRON_DESCRIPTIVE:
        value = getattr(args, "megatron_" + flag[2:].replace("-", "_"), None)
        if kind == "off" and value:
            raise ConfigError(f"{flag}: {what}")
        if kind == "value" and value is not None and value not in allowed:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(f"{flag} {shown}: {what}" + (f" (accepted: {', '.join(map(str, allowed))})"
                                                            if allowed else ""))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed flags (preset values fill shape flags not given)."""
    check_megatron_descriptive_flags(args)
    if getattr(args, "megatron_use_flash_attn", False):
        if args.attention_backend not in ("auto", "flash"):
            raise ConfigError(f"--use-flash-attn asks for --attention-backend flash, but --attention-backend "
                              f"{args.attention_backend} is given")
        args.attention_backend = "flash"
    preset = dict(PRESETS[args.model_preset])
    shape = {}
    for f in dataclasses.fields(ModelConfig):
        if hasattr(args, f.name) and getattr(args, f.name) is not None:
            shape[f.name] = getattr(args, f.name)
        elif f.name in preset:
            shape[f.name] = preset[f.name]

    def pick(cls):
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}

    return RunConfig(
        model=ModelConfig(**shape),
        compute=ComputeConfig(**pick(ComputeConfig)),
        objective=ObjectiveConfig(**pick(ObjectiveConfig)),
        data=DataConfig(**pick(DataConfig)),
        optim=OptimConfig(**pick(OptimConfig)),
        parallel=ParallelConfig(**pick(ParallelConfig)),
        logging=LoggingConfig(**pick(LoggingConfig)),
        checkpoint=CheckpointConfig(**pick(CheckpointConfig)),
    )


def parse_config(argv=None) -> RunConfig:
    """Parse a command line into a RunConfig; bad values exit with the flag named."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
