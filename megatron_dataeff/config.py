"""Typed run configuration: one dataclass per section, the single source of every flag.

Each field's docstring is its `--help` text, its annotation gives the flag's type and choices
(`Literal[...]`), and its default is the flag's default: `megatron_dataeff/arguments.py` builds the
command line from these classes (Megatron-LM's flag names: `num_layers` is `--num-layers`).  Every
section is validated when it is built, whether from the command line, from code or from a
checkpoint's metadata: choices first (`check_choices`), then the section's own cross-field checks
(`validate`).  `RunConfig.validate_layout(world_size)` adds the checks that need the number of
processes.  A config that cannot work fails before anything is built, with a message naming the flags.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megatron_dataeff.data.tokenizers import TOKENIZER_TYPES
from megatron_dataeff.errors import ConfigError
from megatron_dataeff.objectives import OBJECTIVE_NAMES


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def flag_name(name: str) -> str:
    """The command-line flag of a field: `lr_decay_style` -> `--lr-decay-style`."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# What a field is: its docstring, its type and its choices, read from the class itself


@dataclass(frozen=True)
class FieldSpec:
    """One config field as the command line and the validation see it."""

    name: str
    doc: str  # the docstring under the field (its --help text)
    base: type  # int | float | str | bool: the type of one value
    optional: bool  # None is allowed
    is_list: bool  # the value is a list of `base`
    choices: Optional[tuple]  # allowed values (of each element, for a list)
    default: Any  # the dataclass default (a list default is built from its factory)
    cli: dict  # extra command-line options from the field's metadata (see `cli`)

    @property
    def flag(self) -> str:
        return self.cli.get("flag") or flag_name(self.name)


def cli(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, weights: bool = False, **options):
    """A field with options beside its default: `weights` (a model field the shape of the weights depends on:
    a checkpoint only loads into a model with the same value), and for the command line `group` (the
    --help section it is listed in), `negatable` (a bool that also gets --no-FLAG) and `flag` (a flag not
    named after its field)."""
    return field(default=default, default_factory=default_factory, metadata={"cli": options, "weights": weights})


@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> dict[str, str]:
    """{field name: the string literal that follows its annotated assignment} from the class's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _describe(tp) -> tuple[type, bool, bool, Optional[tuple]]:
    """(base type, optional, is_list, choices) of an annotation."""
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        assert len(args) == 1, f"unsupported annotation {tp}"
        tp = args[0]
    is_list = typing.get_origin(tp) is list
    if is_list:
        (tp,) = typing.get_args(tp)
    choices = None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        tp = type(choices[0])
    assert tp in (int, float, str, bool), f"unsupported annotation {tp}"
    return tp, optional, is_list, choices


@functools.lru_cache(maxsize=None)
def field_specs(cls) -> tuple[FieldSpec, ...]:
    """Every field of a config section, in order, with its docstring, type, choices and default."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    specs = []
    for f in dataclasses.fields(cls):
        base, optional, is_list, choices = _describe(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        specs.append(FieldSpec(f.name, docs.get(f.name, ""), base, optional, is_list, choices, default,
                               dict(f.metadata.get("cli", {}))))
    return tuple(specs)


def check_choices(section) -> None:
    """Refuse a field value outside its Literal choices (or a list element outside them), naming the flag."""
    for spec in field_specs(type(section)):
        value = getattr(section, spec.name)
        if value is None:
            _require(spec.optional, f"{spec.flag} needs a value")
            continue
        if spec.is_list:
            _require(isinstance(value, (list, tuple)), f"{spec.flag} takes a list, got {value!r}")
            if spec.choices is not None:
                bad = [v for v in value if v not in spec.choices]
                _require(not bad, f"{spec.flag} takes {', '.join(map(str, spec.choices))}, got "
                                  f"{' '.join(map(str, bad))}")
            setattr(section, spec.name, list(value))
        elif spec.choices is not None:
            _require(value in spec.choices,
                     f"{spec.flag} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")


class _Section:
    """Base of the config sections: choices are checked, then the section's own `validate`."""

    def __post_init__(self):
        check_choices(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks and derived defaults of one section."""


# ----------------------------------------------------------------------------------------------
# Choices

ObjectiveName = Literal[OBJECTIVE_NAMES]
BlockNoise = Literal["per-block", "shared"]
TokenDropoutSchedule = Literal["fixed", "uniform"]
TokenDropoutNoise = Literal["mask", "random", "mixed"]
TokenDropoutAnneal = Literal["none", "linear", "cosine"]
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local", "sdpa", "flex")
AttentionBackend = Literal[ATTENTION_BACKENDS]
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
RecomputeModule = Literal[RECOMPUTE_MODULES]
TokenizerType = Literal[TOKENIZER_TYPES]
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LrDecayStyle = Literal[LR_DECAY_STYLES]
LR_WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
LrWsdDecayStyle = Literal[LR_WSD_DECAY_STYLES]
EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")  # what --exit-signal-handler can catch
ExitSignal = Literal[EXIT_SIGNALS]
Device = Literal["auto", "cuda", "cpu"]

REGULARISATION = "regularisation"  # the --help group of the dropouts and weight decay

AUTO_CHUNK_BYTES = 256 * 2**20  # fp32 bytes of one chunk of the chunked loss when its size is automatic


def auto_chunk_tokens(vocab_per_rank: int) -> int:
    """Tokens per chunk of the chunked loss (`--cross-entropy-chunk-size` not given): one chunk's fp32
    logits [tokens, vocab / TP] take at most AUTO_CHUNK_BYTES."""
    return max(1, AUTO_CHUNK_BYTES // (4 * vocab_per_rank))


def padded_vocab_size(vocab_ids: int, divisible_by: int) -> int:
    """Vocabulary rows of a model: its ids (the tokenizer's and the mask token) rounded up to a multiple of
    `divisible_by` (independent of TP, so layouts agree)."""
    return int(math.ceil(vocab_ids / divisible_by) * divisible_by)


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig(_Section):
    """Shape and regularisers of the GPT model (megatron-core GPTModel)."""

    num_layers: int = cli(4, weights=True)
    """Transformer layers."""
    hidden_size: int = cli(128, weights=True)
    """Model width."""
    ffn_hidden_size: int = cli(384, weights=True)
    """Inner width of the SwiGLU MLP."""
    num_attention_heads: int = cli(4, weights=True)
    """Query heads."""
    num_query_groups: Optional[int] = cli(None, weights=True)
    """Key/value heads (grouped-query attention); default: --num-attention-heads."""
    kv_channels: Optional[int] = cli(None, weights=True)
    """Head dimension; default: --hidden-size / --num-attention-heads."""
    qk_layernorm: bool = cli(False, negatable=True, weights=True)
    """RMSNorm on queries and keys (Qwen3)."""
    seq_length: int = 128
    """Tokens per sample."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence RoPE is set up for; default: --seq-length."""
    rotary_base: int = 10000
    """RoPE base."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    untie_embeddings_and_output_weights: bool = cli(False, negatable=True, weights=True)
    """A separate output layer instead of the transposed input embedding."""
    make_vocab_size_divisible_by: int = cli(128, weights=True)
    """Pad the vocabulary to a multiple of this (independent of TP, so checkpoints reshard)."""
    hidden_dropout: float = cli(0.0, group=REGULARISATION)
    """Dropout on the output of each attention and MLP block, before the residual add."""
    attention_dropout: float = cli(0.0, group=REGULARISATION)
    """Dropout on the attention probabilities (drawn by the attention kernel, per TP rank)."""
    mlp_dropout: float = cli(0.0, group=REGULARISATION)
    """Dropout on the MLP's inner activation (the input of linear_fc2), keyed per sample: the same masks
    under every TP/PP/DP layout."""

    def validate(self):
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
            _require(getattr(self, name) > 0, f"{flag_name(name)} must be positive")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                 f"--num-query-groups {self.num_query_groups}")
        _require(self.max_position_embeddings >= self.seq_length,
                 "--max-position-embeddings must be >= --seq-length")
        for name in ("hidden_dropout", "attention_dropout", "mlp_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{flag_name(name)} must be in [0, 1)")

    def vocab_rows(self, vocab_ids: int) -> int:
        """Rows of the embedding and output layer for `vocab_ids` ids: padded to --make-vocab-size-divisible-by."""
        return padded_vocab_size(vocab_ids, self.make_vocab_size_divisible_by)


def weight_shape_fields() -> tuple[str, ...]:
    """The ModelConfig fields the shape of the weights depends on (declared with `cli(..., weights=True)`)."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("weights"))


@dataclass
class ObjectiveConfig(_Section):
    """What the model learns: AR, AR with token dropout, or masked diffusion."""

    name: ObjectiveName = cli("ar", flag="--objective")
    """ar: next-token prediction with causal attention (with --token-dropout-rate: token dropout); mdm:
    masked diffusion with bidirectional attention and the 1/t-weighted ELBO loss; dual: both in one model,
    each sample trained AR or masked diffusion as its key decides (--ar-fraction), with its own attention
    mask (Samuel & Charpentier, "Dual Language Models")."""
    ar_fraction: Optional[float] = None
    """dual: the fraction of samples trained AR (the rest masked diffusion); default 0.5."""
    token_dropout_rate: float = 0.0
    """ar: replace each input token by the mask token with this probability (the targets stay clean)."""
    token_dropout_schedule: TokenDropoutSchedule = "fixed"
    """fixed: every sequence at --token-dropout-rate R; uniform: a rate r ~ U(0, R) per sequence."""
    token_dropout_noise: TokenDropoutNoise = "mask"
    """What replaces a dropped input token: mask (the mask token), random (a uniformly random vocabulary
    token), mixed (BERT: 80% the mask token, 10% a random token, 10% the token itself)."""
    token_dropout_span: Optional[float] = None
    """Drop geometric spans of this mean length instead of independent tokens; the dropped fraction stays the
    rate (spans are longer where a high rate needs it: at least r / (1 - r))."""
    token_dropout_anneal: TokenDropoutAnneal = "none"
    """Move the token-dropout rate over training, from --token-dropout-rate at the first step to
    --token-dropout-final-rate at the last: linear or cosine; none keeps it fixed."""
    token_dropout_final_rate: float = 0.0
    """With --token-dropout-anneal: the rate at the last step."""
    token_dropout_aux_weight: float = 0.0
    """Masked-input regularisation (MIR): keep the clean next-token loss and add this weight x the loss of
    the same samples with token-dropped inputs (each micro-batch goes through the model twice over: clean
    and corrupted rows together); 0: the inputs themselves are corrupted."""
    mdm_eps: float = 1e-3
    """mdm: mask probability p = (1 - eps) t + eps for t ~ U(0, 1)."""
    mdm_t_min: Optional[float] = None
    """mdm, dual, block: training draws mask rates from [t_min, t_max) instead of [eps, 1): a clipped schedule
    (BD3-LM), for lower-variance gradients; the training loss is then no ELBO, validation keeps [eps, 1) and
    is one.  Default: --mdm-eps."""
    mdm_t_max: float = 1.0
    """mdm, dual, block: the top of the training schedule (see --mdm-t-min)."""
    mdm_stratified: bool = False
    """mdm: stratify t over each global batch (one t per stratum, lower-variance loss)."""
    block_size: Optional[int] = None
    """block: tokens per block (divides --seq-length); 1 is AR-like, --seq-length is masked diffusion."""
    block_noise: BlockNoise = "per-block"
    """block: a mask rate t per block (per-block) or one per sequence (shared)."""

    @property
    def t_min(self) -> float:
        """The bottom of the training schedule: --mdm-t-min, else --mdm-eps."""
        return self.mdm_eps if self.mdm_t_min is None else self.mdm_t_min

    def validate(self):
        _require((self.name == "block") == (self.block_size is not None),
                 "--objective block needs --block-size (and --block-size needs --objective block)")
        _require(self.block_size is None or self.block_size >= 1, "--block-size must be >= 1")
        _require(self.name == "block" or self.block_noise == "per-block", "--block-noise needs --objective block")
        if self.name == "dual" and self.ar_fraction is None:
            self.ar_fraction = 0.5
        _require(self.name == "dual" or self.ar_fraction is None, "--ar-fraction needs --objective dual")
        _require(self.ar_fraction is None or 0.0 < self.ar_fraction < 1.0,
                 "--ar-fraction must be in (0, 1) (0 and 1 are --objective mdm and ar)")
        _require(0.0 <= self.token_dropout_rate <= 1.0, "--token-dropout-rate must be in [0, 1]")
        _require(0.0 <= self.mdm_eps < 1.0, "--mdm-eps must be in [0, 1)")
        _require(0.0 <= self.t_min < self.mdm_t_max <= 1.0,
                 f"--mdm-t-min ({self.t_min}) and --mdm-t-max ({self.mdm_t_max}) need 0 <= t_min < t_max <= 1")
        _require(self.name in ("mdm", "dual", "block") or (self.mdm_t_min is None and self.mdm_t_max == 1.0),
                 f"--mdm-t-min / --mdm-t-max clip masked diffusion's schedule (mdm, dual, block), not {self.name}'s")
        _require(not (self.name != "ar" and self.token_dropout_rate > 0),
                 f"--token-dropout-rate applies to --objective ar; {self.name} masks by its own schedule")
        _require(self.token_dropout_span is None or self.token_dropout_span >= 1,
                 "--token-dropout-span must be >= 1 (a mean span length in tokens)")
        _require(0.0 <= self.token_dropout_final_rate <= 1.0, "--token-dropout-final-rate must be in [0, 1]")
        _require(self.token_dropout_aux_weight >= 0, "--token-dropout-aux-weight must be >= 0")
        _require(self.token_dropout_final_rate == 0.0 or self.token_dropout_anneal != "none",
                 "--token-dropout-final-rate needs --token-dropout-anneal linear or cosine")
        dropout_on = self.token_dropout_rate > 0 or (self.token_dropout_anneal != "none"
                                                     and self.token_dropout_final_rate > 0)
        for flag, given in (("--token-dropout-noise", self.token_dropout_noise != "mask"),
                            ("--token-dropout-span", self.token_dropout_span is not None),
                            ("--token-dropout-anneal", self.token_dropout_anneal != "none"),
                            ("--token-dropout-aux-weight", self.token_dropout_aux_weight > 0)):
            _require(not given or (self.name == "ar" and dropout_on),
                     f"{flag} shapes token dropout: it needs --objective ar and a --token-dropout-rate "
                     f"(or an annealed final rate) above 0")


@dataclass
class ComputeConfig(_Section):
    """How the model is computed: kernels, recomputation, the loss. Changes speed and memory, not the
    model (a checkpoint written under one setting loads under any other)."""

    attention_backend: AttentionBackend = "auto"
    """auto: transformer-engine on a GPU when importable, else sdpa (torch's scaled_dot_product_attention:
    FlashAttention / memory-efficient kernels). flash, fused, unfused: that transformer-engine kernel;
    without TE flash = sdpa's flash kernel, fused = sdpa's cuDNN / memory-efficient kernels (GPU only),
    unfused = local. local: megatron-core's DotProductAttention (materialises [batch, heads, seq, seq]).
    flex: torch's FlexAttention with block masks (compiled on GPUs; no attention dropout); auto takes it on a
    GPU when the attention is more than causal or full (--reset-attention-mask, the dual objective).
    Attention-dropout masks are drawn by the kernel, per tensor-parallel rank, in every backend: not keyed
    per sample, so unlike token dropout and MLP dropout they differ between TP layouts."""
    transformer_impl: Literal["transformer_engine", "local"] = "transformer_engine"
    """transformer_engine: transformer-engine's layers when TE is importable on a GPU (otherwise
    megatron-core's local layers, said at start-up); local: never TE."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation (megatron-core): full = whole layers, selective = --recompute-modules;
    default: keep all activations."""
    recompute_method: Optional[Literal["uniform", "block"]] = None
    """Full recomputation: uniform = every layer, in units of --recompute-num-layers; block = the first
    --recompute-num-layers layers of each pipeline stage."""
    recompute_num_layers: Optional[int] = None
    """Full recomputation: layers per unit (uniform) or per stage (block); default 1."""
    recompute_modules: Optional[list[RecomputeModule]] = None
    """Selective recomputation: which parts of each layer are recomputed; default core_attn."""
    cross_entropy_loss_fusion: bool = False
    """megatron-core's fused vocab-parallel cross entropy (bf16 gradients: needs --bf16)."""
    cross_entropy_fusion_impl: Literal["native", "te", "cce"] = "native"
    """With --cross-entropy-loss-fusion: megatron's native kernel or transformer-engine's (bf16), or cce: Apple's
    Cut Cross-Entropy (`pip install cut-cross-entropy`), the output layer and the loss fused so that the logits
    are never formed (TP = 1; fp32 or bf16; what auto takes on a GPU where it is installed)."""
    cross_entropy_chunk_size: Optional[int] = None
    """The loss in chunks of this many tokens, recomputing each chunk's softmax in backward so that no fp32
    copy of the logits is kept; 0: megatron-core's unchunked loss; default (auto): megatron-core's loss when
    one micro-batch's fp32 logits take at most 1/16 of the memory at hand (the GPU's, or on CPUs the
    machine's shared by its processes), else chunks of at most 256 MiB in fp32 (models/loss_choice.py)."""
    bias_swiglu_fusion: bool = True
    """GPU: fuse the SwiGLU activation (megatron's jit fuser)."""
    bias_dropout_fusion: bool = True
    """GPU: fuse the residual dropout-add."""
    masked_softmax_fusion: bool = True
    """GPU, local attention: fuse the softmax when its kernel is importable."""
    rope_fusion: bool = True
    """GPU with transformer-engine: fuse RoPE."""
    gradient_accumulation_fusion: bool = True
    """GPU with transformer-engine: accumulate weight gradients straight into main_grad."""
    use_cpu_initialization: bool = False
    """GPU: initialise the weights on the CPU from the CPU generator, as a CPU run does (the same start on
    both; CPU runs always do this)."""
    empty_unused_memory_level: Literal[0, 1, 2] = 0
    """GPU: return cached, unused memory to the device (torch.cuda.empty_cache) as Megatron-LM does: 1 after each
    step's forward-backward and after validation, 2 also after each optimizer step (0: never; no effect on CPUs)."""
    manual_gc: bool = False
    """Turn Python's automatic garbage collector off and collect at fixed points instead (Megatron-LM's): at
    the start, every --manual-gc-interval steps, and around validation (--no-manual-gc-eval: not there)."""
    manual_gc_interval: int = 0
    """--manual-gc: steps between collections (0: only at the start and around validation)."""
    manual_gc_eval: bool = True
    """--manual-gc: collect before each validation (and the young generation after it)."""

    def validate(self):
        g = self.recompute_granularity
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
            _require(g == "selective", "--recompute-modules needs --recompute-granularity selective")
            _require(bool(self.recompute_modules), f"--recompute-modules takes {', '.join(RECOMPUTE_MODULES)}")
        _require(self.cross_entropy_chunk_size is None or self.cross_entropy_chunk_size >= 0,
                 "--cross-entropy-chunk-size must be >= 0 (0: one unchunked loss)")
        _require(self.manual_gc_interval >= 0, "--manual-gc-interval must be >= 0")


@dataclass
class DataConfig(_Section):
    """Where tokens come from and how the data-constrained training set is drawn."""

    data_path: list[str] = field(default_factory=list)
    """[weight] prefix ... of Megatron indexed datasets (prefix.bin / prefix.idx); none: the embedded corpus."""
    split: str = "98,2,0"
    """train,valid,test weights over documents."""
    tokenizer_type: Optional[TokenizerType] = None
    """How text becomes ids (data/tokenizers.py); default: GPT2BPETokenizer when --vocab-file/--merge-file
    are given (as Megatron-LM), else ByteTokenizer."""
    tokenizer_model: Optional[str] = None
    """Tokenizer file or directory (HuggingFaceTokenizer, SentencePieceTokenizer)."""
    vocab_file: Optional[str] = None
    """GPT2BPETokenizer: vocab.json."""
    merge_file: Optional[str] = None
    """GPT2BPETokenizer: merges.txt."""
    vocab_size: Optional[int] = None
    """NullTokenizer: vocabulary size."""
    unique_tokens: Optional[int] = None
    """Train on a fixed subset of this many unique tokens, repeated for --epochs (the data-constrained
    regime); default: the whole training split."""
    epochs: Optional[float] = None
    """Passes over the training set; sets --train-iters."""
    data_cache_dir: Optional[str] = None
    """Where the embedded corpus is tokenized and cached; default: a folder under the run directory's
    parent."""
    reset_position_ids: bool = False
    """Packed documents (Megatron-LM's flag): position ids restart at 0 after each EOD token."""
    reset_attention_mask: bool = False
    """Packed documents (Megatron-LM's flag): a token attends only to tokens of its own document (causally for AR
    rows, both ways for masked-diffusion rows)."""
    eod_mask_loss: bool = False
    """Packed documents (Megatron-LM's flag): positions whose input is the EOD token carry no loss and are not
    counted in its normaliser."""

    def validate(self):
        if self.tokenizer_type is None:  # Megatron-LM: a vocab/merge pair means GPT-2 BPE
            self.tokenizer_type = "GPT2BPETokenizer" if (self.vocab_file or self.merge_file) else "ByteTokenizer"
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


@dataclass
class OptimConfig(_Section):
    """Optimizer, schedule and batch."""

    micro_batch_size: int = 4
    """Samples per forward pass per data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step; default: --micro-batch-size x data-parallel size."""
    train_iters: Optional[int] = None
    """Optimizer steps (or give --epochs or --train-samples)."""
    train_samples: Optional[int] = None
    """Train on this many samples instead of --train-iters: iterations = samples // --global-batch-size, and
    the schedule counts samples (Megatron-LM)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate."""
    lr_warmup_iters: int = 0
    """Linear warmup steps."""
    lr_warmup_fraction: Optional[float] = None
    """Warmup length as a fraction of the decay length (--lr-decay-iters / --lr-decay-samples)."""
    lr_warmup_samples: int = 0
    """--train-samples: linear warmup, in samples."""
    lr_decay_samples: Optional[int] = None
    """--train-samples: decay length in samples; default --train-samples."""
    lr_wsd_decay_samples: Optional[int] = None
    """--train-samples, WSD: samples of the final decay; default 10% of the decay length."""
    lr_decay_style: LrDecayStyle = "cosine"
    """Shape of the decay from --lr to --min-lr after the warmup (WSD: constant, then a final decay)."""
    lr_decay_iters: Optional[int] = None
    """Decay length in steps; default --train-iters."""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD: steps of the final decay; default 10% of the decay length."""
    lr_wsd_decay_style: LrWsdDecayStyle = "linear"
    """WSD: shape of the final decay."""
    weight_decay: float = cli(0.1, group=REGULARISATION)
    """AdamW decoupled weight decay (not on norms)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 1234
    """Seed of the weights, the data order and all noise (keyed per sample: the same under every layout)."""
    bf16: bool = cli(False, negatable=True)
    """bf16 parameters and activations with fp32 master weights."""
    skip_nonfinite_steps: bool = False
    """Skip a step whose loss is NaN/inf instead of stopping the run."""
    decoupled_lr: Optional[float] = None
    """Peak learning rate of the input embedding and the output layer (Megatron-LM's; the same warmup and
    decay as --lr); default: --lr."""
    decoupled_min_lr: Optional[float] = None
    """--decoupled-lr: final learning rate of the input embedding and the output layer; default: --min-lr."""

    def validate(self):
        _require(self.micro_batch_size > 0, "--micro-batch-size must be positive")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "need 0 <= --min-lr <= --lr and --lr > 0")
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
        _require(self.decoupled_lr is None or self.decoupled_lr > 0, "--decoupled-lr must be positive")
        _require(self.decoupled_min_lr is None or self.decoupled_lr is not None,
                 "--decoupled-min-lr needs --decoupled-lr")
        _require(self.decoupled_min_lr is None or 0 <= self.decoupled_min_lr <= self.decoupled_lr,
                 "need 0 <= --decoupled-min-lr <= --decoupled-lr")


@dataclass
class ParallelConfig(_Section):
    """How the model and batch are split over processes."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel ranks (split heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (split layers)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (ZeRO-1)."""
    sequence_parallel: bool = False
    """With TP > 1, split norms, dropouts and residuals along the sequence (ignored at TP 1)."""
    overlap_grad_reduce: bool = False
    """GPU: reduce gradient buckets while the backward pass runs."""
    overlap_param_gather: bool = False
    """GPU, with --use-distributed-optimizer: all-gather updated parameters during the forward pass."""
    grad_reduce_in_bf16: bool = False
    """Reduce gradients in bf16 (default fp32)."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient-reduction bucket; default: megatron-core's."""
    device: Device = "auto"
    """auto: CUDA when a GPU is visible, else the CPU (gloo)."""
    distributed_timeout_minutes: int = 30
    """Timeout of collectives: a rank waiting longer fails instead of hanging."""

    def validate(self):
        _require(self.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be positive")
        _require(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        _require(self.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1")
        _require(not self.overlap_param_gather or self.use_distributed_optimizer,
                 "--overlap-param-gather needs --use-distributed-optimizer")
        _require(self.ddp_bucket_size is None or self.ddp_bucket_size > 0, "--ddp-bucket-size must be positive")


@dataclass
class LoggingConfig(_Section):
    """What is reported, where and how often."""

    log_interval: int = 10
    """Steps between train log lines and records."""
    eval_interval: int = 100
    """Steps between validation runs (0: only at the end)."""
    eval_iters: int = 10
    """Validation batches per evaluation."""
    run_dir: Optional[str] = None
    """Everything a run writes (run.json, metrics.jsonl, status.json, TensorBoard), unless given elsewhere; default:
    --log-dir, else --save, else a new runs/<date>-<time> directory.  A run never writes into a directory that
    holds another run's record (run.json) unless it continues that run: its --load or --save is the recorded
    run's --save."""
    log_dir: Optional[str] = None
    """Where metrics.jsonl goes; default: the run directory."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event files; default: RUN_DIR/tensorboard; "" turns TensorBoard off."""
    wandb_project: Optional[str] = None
    """Log to Weights & Biases under this project (needs `pip install wandb`; WANDB_MODE=offline works with
    no network); default: off."""
    wandb_exp_name: Optional[str] = None
    """W&B run name; default: the last part of --run-dir."""
    wandb_save_dir: Optional[str] = None
    """Where W&B keeps its files (offline runs too); default: RUN_DIR/wandb."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU; default from the GPU name (H100/H200 bf16 989, A100 312; none on
    CPUs)."""
    logging_level: Optional[int] = None
    """Level of Python's root logger (Megatron-LM's: 10 debug, 20 info, 30 warning, ...); default: unchanged."""

    def validate(self):
        _require(self.log_interval > 0, "--log-interval must be positive")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be positive")
        _require(self.eval_interval >= 0 and self.eval_iters >= 0, "--eval-interval/--eval-iters must be >= 0")
        _require(self.wandb_project is None or self.wandb_project.strip() != "", "--wandb-project is empty")
        _require(self.wandb_project is not None or (self.wandb_exp_name is None and self.wandb_save_dir is None),
                 "--wandb-exp-name and --wandb-save-dir need --wandb-project")
        if self.run_dir is not None:
            self.place(self.run_dir)

    def place(self, run_dir: str) -> None:
        """Put the run in `run_dir`: the defaults of the places that follow it."""
        self.run_dir = run_dir
        if self.log_dir is None:
            self.log_dir = self.run_dir
        if self.tensorboard_dir is None:
            self.tensorboard_dir = f"{self.run_dir}/tensorboard"
        if self.wandb_project is not None and self.wandb_save_dir is None:
            self.wandb_save_dir = f"{self.run_dir}/wandb"


@dataclass
class CheckpointConfig(_Section):
    """Saving, resuming and exiting early."""

    save: Optional[str] = None
    """Directory for checkpoints (iter_NNNNNNN/, latest_checkpointed_iteration.txt); default: none saved."""
    load: Optional[str] = None
    """Directory to resume from (its newest intact checkpoint). --save X --load X resumes a run wherever it
    stopped: a relaunched or requeued job, or a worker group that torchrun --max-restarts N restarts after a
    worker died."""
    save_interval: Optional[int] = None
    """Steps between checkpoints; default: only at the end."""
    keep_last: Optional[int] = None
    """Keep only the newest K checkpoints; default: all."""
    finetune: bool = False
    """Load only the weights of --load and start at iteration 0 with a fresh optimizer and schedule."""
    checkpoint_fallback: bool = cli(True, negatable=True)
    """Resuming: when the newest checkpoint is damaged (a file missing, truncated or altered against the sizes
    and checksums recorded at save, or its metadata missing), say so and load the newest intact one before it;
    --no-checkpoint-fallback refuses instead, naming the damage."""
    use_checkpoint_args: bool = False
    """Take the model shape and tokenizer from the --load checkpoint (e.g. one made by tools/import_hf.py)
    instead of the flags."""
    override_opt_param_scheduler: bool = False
    """Resuming: use this command line's schedule (iterations, lr, min-lr, warmup, decay, weight decay) where
    it differs from the checkpoint's, e.g. to extend a run with a larger --train-iters. Without this or
    --use-checkpoint-opt-param-scheduler a difference is an error naming both values."""
    use_checkpoint_opt_param_scheduler: bool = False
    """Resuming: keep the checkpoint's schedule whatever the command line says."""
    exit_signal_handler: bool = cli(False, group="exits")
    """Catch --exit-signal: finish the step in flight, agree over all ranks, save, exit 0."""
    exit_signal: list[ExitSignal] = cli(default_factory=lambda: ["SIGTERM", "SIGUSR1"], group="exits")
    """Signals --exit-signal-handler catches (SIGTERM: preemption; SIGUSR1: what SLURM's
    --signal=USR1@SECONDS sends before the time limit)."""
    exit_duration_in_mins: Optional[float] = cli(None, group="exits")
    """Save and exit once this many minutes have passed since the trainer started."""
    exit_interval: Optional[int] = cli(None, group="exits")
    """Save and exit after the first iteration divisible by this."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core's asynchronous torch_dist save): training waits
    only while the state is staged, a forked writer saves it, and the checkpoint is published (renamed,
    `latest` advanced) once every rank's writer has finished, so a kill mid-save leaves the previous one
    as `latest`; a writer that fails (a full disk) stops the run as a failed synchronous save does. The final
    save and a save before an early exit are synchronous."""
    ckpt_format: str = "torch_dist"
    """torch_dist only: megatron-core dist_checkpointing, the one format written (loads at any TP/PP/DP
    layout)."""

    def validate(self):
        _require(self.ckpt_format == "torch_dist",
                 f"--ckpt-format {self.ckpt_format}: checkpoints are megatron-core torch_dist (resharding across "
                 f"TP/PP/DP); other formats are not written")
        _require(self.save_interval is None or self.save_interval > 0, "--save-interval must be positive")
        _require(not self.async_save or self.save is not None, "--async-save needs --save")
        _require(self.keep_last is None or self.keep_last > 0, "--keep-last must be positive")
        _require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                 "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
        _require(bool(self.exit_signal), f"--exit-signal takes {', '.join(EXIT_SIGNALS)}")
        _require(self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0,
                 "--exit-duration-in-mins must be positive")
        _require(self.exit_interval is None or self.exit_interval > 0, "--exit-interval must be positive")


# {section: {old field name: new field name}}: renames since configs were first written to checkpoints
RENAMED_FIELDS = {"objective": {"objective": "name"}}


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

    def place_run(self) -> str:
        """The run directory (see --run-dir): given, else --log-dir, else --save, else a new runs/<date>-<time>."""
        lg = self.logging
        if lg.run_dir is None:
            lg.place(lg.log_dir or self.checkpoint.save or time.strftime("runs/%Y%m%d-%H%M%S"))
        return lg.run_dir

    def validate_layout(self, world_size: int) -> int:
        """Checks that need the process count or span sections; returns the data-parallel size."""
        self.place_run()
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
        b = self.objective.block_size
        _require(b is None or m.seq_length % b == 0,
                 f"--block-size {b} does not divide --seq-length {m.seq_length}")
        if p.sequence_parallel:
            _require(m.seq_length % tp == 0,
                     f"--sequence-parallel: --tensor-model-parallel-size {tp} does not divide --seq-length "
                     f"{m.seq_length}")
        c = self.compute
        cce = c.cross_entropy_loss_fusion and c.cross_entropy_fusion_impl == "cce"
        _require(not c.cross_entropy_loss_fusion or o.bf16 or cce,
                 "--cross-entropy-loss-fusion: megatron-core's fused cross entropy returns bf16 gradients; "
                 "use it with --bf16 (or --cross-entropy-fusion-impl cce, or leave the loss to auto)")
        _require(not cce or tp == 1,
                 f"--cross-entropy-fusion-impl cce computes the whole vocabulary's loss on one rank: it needs "
                 f"--tensor-model-parallel-size 1, not {tp} (under TP use native, te or leave the loss to auto)")
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
        self.data.__post_init__()

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per data-parallel rank per step."""
        return self.optim.global_batch_size // (self.optim.micro_batch_size * dp)

    def to_dict(self) -> dict:
        """Plain-dict form, for run records and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Inverse of `to_dict` (keys a section no longer has are ignored; renamed fields of configs written
        by earlier versions are read under their new name)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory
            known = {g.name for g in dataclasses.fields(section_cls)}
            values = dict(d.get(f.name, {}))
            for old, new in RENAMED_FIELDS.get(f.name, {}).items():
                if old in values and new not in values:
                    values[new] = values.pop(old)
            kwargs[f.name] = section_cls(**{k: v for k, v in values.items() if k in known})
        return cls(**kwargs)
