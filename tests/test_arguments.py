"""The command line is generated from the config dataclasses: every flag described, one set of defaults
and choices, and the same validation whether a config comes from flags, from code or from a checkpoint."""

import os
import subprocess
import sys

import pytest

from megatron_dataeff.arguments import SECTIONS, build_parser, config_from_args, parse_config
from megatron_dataeff.objectives import objective_class
from megatron_dataeff.config import (LR_DECAY_STYLES, LR_WSD_DECAY_STYLES, CheckpointConfig, ComputeConfig,
                                     ConfigError, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig,
                                     field_specs)
from tests.conftest import ROOT


def _actions():
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


def test_every_field_is_a_flag_with_its_docstring_as_help():
    """Each field of each section has a docstring, and the flag named after it shows that text in --help."""
    actions = _actions()
    for _, cls, _ in SECTIONS:
        for spec in field_specs(cls):
            assert spec.doc, f"{cls.__name__}.{spec.name} has no docstring"
            action = actions[spec.name]
            assert spec.flag in action.option_strings or "--no-" + spec.flag[2:] in action.option_strings
            assert action.help.replace("%%", "%").startswith(spec.doc.rstrip("."))


def test_every_flag_is_described():
    """No flag of pretrain_diffusion.py is left without help text (Megatron-LM's descriptive flags included)."""
    undescribed = [a.option_strings for a in build_parser()._actions if not (a.help or "").strip()]
    assert not undescribed


def test_defaults_and_choices_come_from_the_dataclasses():
    """A parsed empty command line equals the dataclass defaults; choices are the Literal values."""
    from_flags = parse_config([])
    assert from_flags == RunConfig(model=ModelConfig(num_query_groups=2))  # the tiny preset's one difference
    actions = _actions()
    assert actions["lr_decay_style"].choices == list(LR_DECAY_STYLES)
    assert actions["lr_wsd_decay_style"].choices == list(LR_WSD_DECAY_STYLES)
    for _, cls, _ in SECTIONS:
        for spec in field_specs(cls):
            if spec.choices is not None:
                assert list(actions[spec.name].choices) == list(spec.choices), spec.name
            if cls is not ModelConfig and spec.base is not bool:
                assert actions[spec.name].default == spec.default, spec.name


@pytest.mark.parametrize("section, kwargs, message", [
    (OptimConfig, {"lr_decay_style": "exponential"}, "--lr-decay-style must be one of constant, linear, cosine, "
                                                     "inverse-square-root, WSD, got 'exponential'"),
    (OptimConfig, {"lr_wsd_decay_style": "cubic"}, "--lr-wsd-decay-style must be one of linear, cosine"),
    (ComputeConfig, {"attention_backend": "xformers"}, "--attention-backend must be one of"),
    (ComputeConfig, {"recompute_granularity": "selective", "recompute_modules": ["mlp", "qkv"]},
     "--recompute-modules takes core_attn, mlp, layernorm, got qkv"),
    (DataConfig, {"tokenizer_type": "GPT3Tokenizer"}, "--tokenizer-type must be one of ByteTokenizer"),
    (CheckpointConfig, {"exit_signal": ["SIGKILL"]}, "--exit-signal takes SIGTERM"),
    (ModelConfig, {"num_layers": None}, "--num-layers needs a value"),
    (CheckpointConfig, {"async_save": True}, "--async-save needs --save"),
    (ObjectiveConfig, {"token_dropout_noise": "random"}, "--token-dropout-noise shapes token dropout: it needs"),
    (ObjectiveConfig, {"name": "mdm", "token_dropout_span": 3.0}, "--token-dropout-span shapes token dropout"),
    (ObjectiveConfig, {"token_dropout_rate": 0.3, "token_dropout_span": 0.5}, "--token-dropout-span must be >= 1"),
    (ObjectiveConfig, {"token_dropout_rate": 0.3, "token_dropout_final_rate": 0.1},
     "--token-dropout-final-rate needs --token-dropout-anneal"),
    (ObjectiveConfig, {"token_dropout_noise": "bert"}, "--token-dropout-noise must be one of mask, random, mixed"),
    (ObjectiveConfig, {"ar_fraction": 0.3}, "--ar-fraction needs --objective dual"),
    (ObjectiveConfig, {"name": "dual", "ar_fraction": 1.0}, r"--ar-fraction must be in \(0, 1\)"),
    (ObjectiveConfig, {"name": "dual", "token_dropout_rate": 0.3}, "--token-dropout-rate applies to --objective ar"),
])
def test_choices_are_checked_when_a_config_is_built_in_code(section, kwargs, message):
    """A config made in code gets the checks the command line gets (argparse is not the only guard)."""
    with pytest.raises(ConfigError, match=message):
        section(**kwargs)


def test_choices_are_checked_when_a_config_comes_from_a_checkpoint():
    """RunConfig.from_dict (what a checkpoint's metadata gives) validates as the flags do."""
    d = parse_config([]).to_dict()
    d["optim"]["lr_wsd_decay_style"] = "cubic"
    with pytest.raises(ConfigError, match="--lr-wsd-decay-style"):
        RunConfig.from_dict(d)


def test_switches_follow_megatron_conventions():
    """Off-by-default booleans are switches, on-by-default ones are turned off by --no-NAME, and the shape
    switches can be turned either way against a preset."""
    cfg = parse_config(["--no-bias-swiglu-fusion", "--bf16", "--use-distributed-optimizer"])
    assert not cfg.compute.bias_swiglu_fusion and cfg.compute.bias_dropout_fusion
    assert cfg.optim.bf16 and cfg.parallel.use_distributed_optimizer
    assert parse_config(["--model-preset", "qwen3-0.6b"]).model.qk_layernorm
    assert not parse_config(["--model-preset", "qwen3-0.6b", "--no-qk-layernorm"]).model.qk_layernorm
    assert parse_config(["--exit-signal", "SIGUSR2"]).checkpoint.exit_signal == ["SIGUSR2"]


def test_regularisers_are_listed_together():
    """--help lists the dropouts and weight decay in one group, whatever section holds them."""
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == "regularisation")
    assert {a.dest for a in group._group_actions} == {"hidden_dropout", "attention_dropout", "mlp_dropout",
                                                      "weight_decay"}


def test_help_prints_every_flag():
    """`pretrain_diffusion.py --help` exits 0 and shows each flag with its default."""
    env = {**os.environ, "COLUMNS": "400"}  # one line per flag's help
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    for _, cls, _ in SECTIONS:
        for spec in field_specs(cls):
            assert spec.flag in proc.stdout or "--no-" + spec.flag[2:] in proc.stdout
    assert "(default: cosine)" in proc.stdout and "10% of the decay length" in proc.stdout


def test_objective_flag_and_configs_of_earlier_versions():
    """--objective fills ObjectiveConfig.name; a config written before the rename (its `objective` key, as
    in older checkpoints and run.json files) reads the same."""
    cfg = parse_config(["--objective", "mdm"])
    cls = objective_class(cfg.objective)
    assert cfg.objective.name == "mdm" and cls.diffusion and cls.bidirectional
    old = cfg.to_dict()
    old["objective"]["objective"] = old["objective"].pop("name")
    assert RunConfig.from_dict(old) == cfg


@pytest.mark.parametrize("argv", [
    [],
    ["--objective", "mdm", "--num-layers", "3", "--bf16", "--weight-decay", "0.3", "--no-bias-swiglu-fusion"],
    ["--model-preset", "qwen3-0.6b", "--objective", "dual", "--ar-fraction", "0.5", "--data-path", "1", "a", "1", "b",
     "--mlp-dropout", "0.1"],
    ["--token-dropout-rate", "0.2", "--token-dropout-noise", "mixed", "--lr", "3e-4", "--seed", "7"],
])
def test_command_line_rebuilds_the_config(argv):
    """command_line(cfg) (the model card's flags) parses back to the same config."""
    from megatron_dataeff.arguments import command_line

    cfg = config_from_args(build_parser().parse_args(argv))
    assert config_from_args(build_parser().parse_args(command_line(cfg))).to_dict() == cfg.to_dict()
