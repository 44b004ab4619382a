"""The pretrain_diffusion.py command line, generated from the config dataclasses (Megatron-LM's names).

Every field of a section in `megatron_dataeff/config.py` is one flag: `--` + its name with dashes, its
docstring as the `--help` text, its `Literal` choices as the flag's choices and its dataclass default as
the flag's default (shown in `--help`).  Booleans that default off are switches (`--bf16`); those that
default on are turned off by `--no-NAME` (Megatron-LM's `--no-bias-swiglu-fusion`).  The shape flags of
`ModelConfig` take the `--model-preset` value when not given.  Beside them, Megatron-LM flags that
describe what this framework always builds are accepted, or refused by name where they ask for
something else (`MEGATRON_DESCRIPTIVE`: the model family's from `models/family.py`, the rest below).
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_dataeff.config import (REGULARISATION, CheckpointConfig, ComputeConfig, ConfigError, DataConfig,
                                     FieldSpec, LoggingConfig, ModelConfig, ObjectiveConfig, OptimConfig,
                                     ParallelConfig, RunConfig, field_specs)
from megatron_dataeff.models.family import megatron_lm_flags
from megatron_dataeff.models.presets import PRESETS

# The RunConfig attribute of each section, in --help order, with the title of its --help group.
SECTIONS = (
    ("model", ModelConfig, "model (--model-preset fills these; a flag given wins)"),
    ("objective", ObjectiveConfig, "objective"),
    ("data", DataConfig, "data"),
    ("optim", OptimConfig, "optimization"),
    ("compute", ComputeConfig, "compute (speed and memory; the model is the same under every choice)"),
    ("parallel", ParallelConfig, "parallelism"),
    ("logging", LoggingConfig, "logging"),
    ("checkpoint", CheckpointConfig, "checkpointing"),
)
GROUP_TITLES = {
    REGULARISATION: "regularisation",
    "exits": "exiting early (each saves a checkpoint to --save and exits 0; resume with --load)",
}
_PRESET_FILLED = ModelConfig  # its flags default to None so that the preset (then the dataclass) fills them


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _help(spec: FieldSpec, preset_filled: bool) -> str:
    text = spec.doc.rstrip(".")
    in_preset = preset_filled and any(spec.name in p for p in PRESETS.values())
    if in_preset:
        text += " (or the --model-preset value"
        if spec.default is not None:
            text += f"; else {('on' if spec.default else 'off') if spec.base is bool else _shown(spec.default)}"
        text += ")"
    elif spec.base is bool:
        if spec.default and not spec.cli.get("negatable"):
            text += " (on by default; --no-" + spec.flag[2:] + " turns it off)"
    elif spec.default is not None and spec.default != []:
        text += f" (default: {_shown(spec.default)})"
    return text.replace("%", "%%")


def _add_field(group, spec: FieldSpec, preset_filled: bool) -> None:
    """One flag from one field."""
    kwargs = {"dest": spec.name, "help": _help(spec, preset_filled)}
    default = None if preset_filled else spec.default
    if spec.base is bool:
        if spec.cli.get("negatable"):
            group.add_argument(spec.flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif spec.default:
            group.add_argument("--no-" + spec.flag[2:], action="store_false", default=True, **kwargs)
        else:
            group.add_argument(spec.flag, action="store_true", default=None if preset_filled else False, **kwargs)
        return
    if spec.is_list:
        kwargs["nargs"] = "*" if spec.default == [] else "+"
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    group.add_argument(spec.flag, type=spec.base, default=default, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The pretrain_diffusion.py command line: one flag per config field, plus --model-preset and the
    Megatron-LM descriptive flags."""
    p = argparse.ArgumentParser(
        prog="pretrain_diffusion.py",
        usage="%(prog)s [--model-preset NAME] [--FLAG VALUE ...]   (torchrun --nproc-per-node N %(prog)s ... "
              "for several processes)",
        description="Train AR, token-dropout and masked-diffusion GPT models on megatron-core. Every flag below "
                    "is a field of megatron_dataeff/config.py.",
    )
    groups = {}
    for attr, cls, title in SECTIONS:
        g = groups[attr] = p.add_argument_group(title)
        if cls is ModelConfig:
            g.add_argument("--model-preset", choices=sorted(PRESETS), default="tiny",
                           help="named model shape (models/presets.py) that fills the shape flags not given "
                                "(default: tiny)")
    for key, title in GROUP_TITLES.items():
        groups[key] = p.add_argument_group(title)
    for attr, cls, _ in SECTIONS:
        for spec in field_specs(cls):
            _add_field(groups[spec.cli.get("group", attr)], spec, cls is _PRESET_FILLED)
    _add_megatron_descriptive_flags(p)
    return p


# Megatron-LM flags that describe what is built here: the one model family (dense GPT, RMSNorm, SwiGLU, RoPE,
# no biases: `models/family.py` states those), and how it is trained (per-token loss, bf16, the parallelisms,
# below): accepted where they say what is built, refused by name where they ask for something else.  (flag,
# argparse kind, accepted values (None: any value; for a switch: None), what is built instead)
_ALWAYS = "always so here"
_FP8 = "FP8 training is not supported: drop the --fp8-* flags (--bf16 is the low precision here)"
_FSDP = ("Megatron-FSDP is not supported: drop the FSDP flags (--use-distributed-optimizer shards the optimizer "
         "state over data-parallel ranks)")
_PROFILE = ("built-in profiling is not supported: drop --profile and the --profile-* flags and run under nsys or "
            "torch.profiler")
_TRAINING_SWITCHES = (
    ("--use-mcore-models", "on", None, _ALWAYS),
    ("--group-query-attention", "on", None, "--num-query-groups sets the key/value heads"),
    ("--log-throughput", "on", None, "every train record has tokens/s, TFLOP/s and MFU"),
    ("--calculate-per-token-loss", "on", None, "the loss is always a mean over the global batch's tokens"),
    ("--attention-softmax-in-fp32", "on", None, "attention softmax accumulates in fp32"),
    ("--no-create-attention-mask-in-dataloader", "on", None,
     "no attention mask is built in the data loader: the objective gives the attention its mask"),
    ("--fp16", "off", None, "fp16 with loss scaling is not supported: use --bf16"),
    ("--fp8-param-gather", "off", None, _FP8),
    ("--mock-data", "off", None, "synthetic data is not generated: give --data-path, or leave it out to train on "
                                 "the built-in test corpus"),
    ("--no-mmap-bin-files", "off", None, "the .bin files are always memory-mapped (the tokens read are the same): "
                                         "drop the flag"),
    ("--no-check-for-nan-in-loss-and-grad", "off", None,
     "a NaN/inf loss always stops the run: drop the flag, or pass --skip-nonfinite-steps to skip such steps"),
    ("--use-megatron-fsdp", "off", None, _FSDP),
    ("--fsdp-double-buffer", "off", None, _FSDP),
    ("--fsdp-manual-registration", "off", None, _FSDP),
    ("--init-model-with-meta-device", "off", None, "meta-device initialisation (for Megatron-FSDP) is not "
                                                   "supported: drop the flag"),
    ("--use-nccl-ub", "off", None, "NCCL user-buffer registration is not supported: drop the flag"),
    ("--profile", "off", None, _PROFILE),
    ("--record-memory-history", "off", None, "memory-history snapshots are not recorded: drop the flag (and "
                                             "use torch.cuda.memory._record_memory_history in a profiling run)"),
)
_TRAINING_VALUES = (
    ("--context-parallel-size", "value", (1,), "context parallelism is not supported (TP, PP, DP, SP are)"),
    ("--distributed-backend", "value", ("nccl", "gloo"), "NCCL on GPUs, gloo on CPUs"),
    ("--rampup-batch-size", "value", (), "batch-size ramp-up is not supported: the global batch is fixed"),
    ("--num-layers-per-virtual-pipeline-stage", "value", (), "interleaved pipeline schedules are not supported"),
    ("--step-batch-size-schedule", "value", (), "batch-size schedules are not supported: the global batch is "
                                                "fixed (--global-batch-size)"),
    ("--fp8-format", "value", (), _FP8),
    ("--fp8-amax-history-len", "value", (), _FP8),
    ("--fp8-amax-compute-algo", "value", (), _FP8),
    ("--data-parallel-sharding-strategy", "value", ("no_shard",), _FSDP),
    ("--num-workers", "value", (0,), "batches are read in the training process, as Megatron-LM's --num-workers 0: "
                                     "drop the flag"),
    ("--profile-step-start", "value", (), _PROFILE),
    ("--profile-step-end", "value", (), _PROFILE),
    ("--profile-ranks", "value", (), _PROFILE),
    ("--tiktoken-pattern", "value", ("v1", "v2"),
     "read only by --tokenizer-type TikTokenizer (not built here); ignored with the others, as in Megatron-LM"),
    ("--data-cache-path", "value", None, "no dataset index files are cached (the sample order is computed at "
                                         "start); the directory is not used"),
)
_MANY = ("--rampup-batch-size", "--step-batch-size-schedule", "--profile-ranks")  # flags taking several values
_KINDS = ("on", "off", "value")  # --help and checking order: accepted switches, refused switches, values
MEGATRON_DESCRIPTIVE = tuple(sorted((*_TRAINING_SWITCHES, *megatron_lm_flags(), *_TRAINING_VALUES),
                                    key=lambda entry: _KINDS.index(entry[1])))


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
            nargs = "+" if flag in _MANY else None
            shown = "any value" if allowed is None else ", ".join(str(a) for a in allowed) or "nothing"
            g.add_argument(flag, dest=dest, type=typ, nargs=nargs, default=None, metavar=flag[2:].upper().replace("-", "_"),
                           help=f"accepts {shown}: {what}")
    g.add_argument("--use-flash-attn", dest="megatron_use_flash_attn", action="store_true",
                   help="Megatron-LM's older spelling of --attention-backend flash")


def check_megatron_descriptive_flags(args: argparse.Namespace) -> None:
    """Refuse, by name, a Megatron-LM flag that asks for something this framework does not build."""
    for flag, kind, allowed, what in MEGATRON_DESCRIPTIVE:
        value = getattr(args, "megatron_" + flag[2:].replace("-", "_"), None)
        if kind == "off" and value:
            raise ConfigError(f"{flag}: {what}")
        if kind == "value" and value is not None and allowed is not None and value not in allowed:
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
    preset = PRESETS[getattr(args, "model_preset", "tiny")]
    sections = {}
    for attr, cls, _ in SECTIONS:
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is None and cls is _PRESET_FILLED:
                if f.name in preset:
                    values[f.name] = preset[f.name]
                continue  # the dataclass default
            if hasattr(args, f.name):
                values[f.name] = value
        sections[attr] = cls(**values)
    return RunConfig(**sections)


def parse_config(argv=None) -> RunConfig:
    """Parse a command line into a RunConfig; bad values exit with the flag named."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))


def command_line(cfg: RunConfig) -> list[str]:
    """The flags that rebuild `cfg` (those whose value differs from what the command line gives without them):
    `config_from_args(build_parser().parse_args(command_line(cfg)))` equals `cfg`."""
    preset = PRESETS[build_parser().get_default("model_preset")]
    argv: list[str] = []
    for attr, cls, _ in SECTIONS:
        section = getattr(cfg, attr)
        for spec in field_specs(cls):
            value = getattr(section, spec.name)
            reference = preset.get(spec.name, spec.default) if cls is _PRESET_FILLED else spec.default
            if value == reference:
                continue
            if spec.base is bool and not spec.is_list:
                if value:
                    argv.append(spec.flag)
                elif spec.cli.get("negatable") or (spec.default and cls is not _PRESET_FILLED):
                    argv.append("--no-" + spec.flag[2:])
                else:
                    raise ConfigError(f"{spec.flag}: off here but on in the default --model-preset; no flag says so")
            elif value is None:
                raise ConfigError(f"{spec.flag}: None here, {reference!r} by default; no flag says so")
            elif spec.is_list:
                argv += [spec.flag, *map(str, value)]
            else:
                argv += [spec.flag, str(value)]
    return argv
