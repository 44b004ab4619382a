"""Configs that cannot work fail at once, naming the flags."""

import subprocess
import sys

import pytest

from megatron_dataeff.config import ConfigError, RunConfig
from megatron_dataeff.arguments import parse_config, config_from_args, build_parser
from tests.conftest import ROOT


def _cfg(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("argv, world, message", [
    (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3"], 3,
     "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size 3 does not divide --num-layers 4"),
    (["--micro-batch-size", "3", "--global-batch-size", "8"], 2,
     "--global-batch-size 8 is not divisible by --micro-batch-size 3 x data-parallel size 2"),
    (["--num-query-groups", "2", "--num-attention-heads", "8", "--hidden-size", "128",
      "--tensor-model-parallel-size", "4"], 4, "--tensor-model-parallel-size 4 does not divide --num-query-groups 2"),
])
def test_layout_errors_name_the_flags(argv, world, message):
    """validate_layout refuses impossible layouts with the flags in the message."""
    cfg = _cfg(*argv)
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        cfg.validate_layout(world)


@pytest.mark.parametrize("argv, message", [
    (["--num-attention-heads", "8", "--num-query-groups", "3"], "--num-attention-heads 8 is not divisible by --num-query-groups 3"),
    (["--hidden-size", "130", "--num-attention-heads", "4"], "--hidden-size 130 is not divisible by --num-attention-heads 4"),
    (["--mlp-dropout", "1.0"], "--mlp-dropout must be in"),
    (["--token-dropout-rate", "1.5"], "--token-dropout-rate must be in"),
    (["--objective", "mdm", "--token-dropout-rate", "0.3"], "--token-dropout-rate applies to --objective ar"),
    (["--split", "a,b"], "--split must be"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr"),
])
def test_field_errors_name_the_flags(argv, message):
    """Section validation refuses bad values naming the flag."""
    with pytest.raises(ConfigError, match=message):
        _cfg(*argv)


def test_preset_fills_shape_and_flags_override():
    """--model-preset fills the shape; an explicit flag wins."""
    cfg = _cfg("--model-preset", "qwen3-0.6b", "--num-layers", "2")
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 1024 and cfg.model.qk_layernorm
    assert cfg.model.num_query_groups == 8 and cfg.model.kv_channels == 128


def test_config_round_trips_through_dict():
    """to_dict/from_dict preserve a config (checkpoints store it)."""
    cfg = _cfg("--objective", "mdm", "--mlp-dropout", "0.1", "--seq-length", "64")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_exits_with_message_before_any_work():
    """The entry point rejects a bad layout with exit status 2 and the flag in stderr."""
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), "--num-attention-heads", "4",
                           "--hidden-size", "128", "--num-query-groups", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--num-attention-heads 4 is not divisible by --num-query-groups 3" in proc.stderr
    with pytest.raises(SystemExit):
        parse_config(["--micro-batch-size", "0"])
