"""The model family's one table (models/family.py) and the model-shape arithmetic (models/shape.py)."""

import argparse
import dataclasses
import inspect
import subprocess
import sys

import pytest

from megatron_dataeff.arguments import MEGATRON_DESCRIPTIVE, build_parser, config_from_args
from megatron_dataeff.config import ConfigError
from megatron_dataeff.models import family
from megatron_dataeff.models.shape import ModelShape


def test_table_is_read_without_torch():
    """The table, the shape and the command line import no torch; FAMILY_OPTIONS brings torch's silu when read."""
    code = ("import sys; import megatron_dataeff.models.family as f, megatron_dataeff.models.shape, "
            "megatron_dataeff.arguments; print('torch' in sys.modules); "
            "import torch.nn.functional as F; print(f.FAMILY_OPTIONS['activation_func'] is F.silu)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_every_fact_is_stated_somewhere_and_says_what_is_built():
    """Each fact has a clause and at least one of a TransformerConfig field, a GPTModel argument or a Megatron-LM
    attribute; a flag the command line takes is one a Megatron-LM attribute stands behind."""
    for fact in family.FACTS:
        assert fact.built and (fact.config or fact.gpt_model or fact.megatron_lm), fact
        assert not fact.cli or (fact.flag and fact.megatron_lm), fact
        assert not fact.also or fact.megatron_lm, fact
    names = [f.config[0] for f in family.FACTS if f.config]
    assert len(names) == len(set(names))
    assert set(family.FAMILY_OPTIONS).isdisjoint(family.FAMILY_DEFAULTS)


def test_family_defaults_are_megatron_cores_defaults():
    """Every option the family names is a TransformerConfig field of the installed megatron-core (the HF export
    checks a model's config by these names: a renamed option must fail here, not be skipped there); what the
    builder leaves unset is megatron-core's default; GPTModel takes the family's arguments."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dataeff.export.hf_mapping import REQUIRED_MEGATRON_OPTIONS

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(REQUIRED_MEGATRON_OPTIONS) == {**family.FAMILY_OPTIONS, **family.FAMILY_DEFAULTS}.keys()
    assert not set(REQUIRED_MEGATRON_OPTIONS) - fields, sorted(set(REQUIRED_MEGATRON_OPTIONS) - fields)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **family.FAMILY_OPTIONS)
    for name, value in REQUIRED_MEGATRON_OPTIONS.items():
        assert getattr(config, name) == value, name
    params = inspect.signature(GPTModel).parameters
    assert set(family.FAMILY_MODEL_ARGS) <= set(params)


def test_command_line_accepts_the_family_and_refuses_by_the_facts_clause():
    """Each family flag of MEGATRON_DESCRIPTIVE comes from the table: accepted with the family's value, refused
    otherwise with the fact's clause."""
    rendered = set(family.megatron_lm_flags())
    assert rendered <= set(MEGATRON_DESCRIPTIVE)
    accept = []
    for flag, kind, allowed, _ in rendered:
        accept += [flag] if kind == "on" else [flag, str(allowed[0])] if kind == "value" else []
    config_from_args(build_parser().parse_args(accept))
    for fact in family.FACTS:
        if fact.cli in ("off", "value"):
            argv = [fact.flag] if fact.cli == "off" else [fact.flag, "other" if isinstance(fact.megatron_lm[1], str)
                                                          else "0.5"]
            with pytest.raises(ConfigError, match=f"{fact.flag}.*: {fact.built}"):
                config_from_args(build_parser().parse_args(argv))


def test_megatron_lm_namespace_passes_its_own_check_and_each_change_is_named():
    """The family's Megatron-LM args pass the checkpoint check; each checked one changed (or stated under its
    other name) gives one line naming the flag and what is built."""
    ns = dict(family.MEGATRON_LM_ARGS)
    assert family.megatron_lm_problems(argparse.Namespace(**ns)) == []
    assert family.megatron_lm_problems(argparse.Namespace()) == []  # absent attributes are the family's
    for fact in family.FACTS:
        if not fact.megatron_lm:
            continue
        attr, value = fact.megatron_lm
        other = "other" if isinstance(value, str) else (8 if value is None else (0.5 if isinstance(value, float)
                                                                                 else not value))
        problems = family.megatron_lm_problems(argparse.Namespace(**{**ns, attr: other}))
        assert problems == ([f"{fact.flag} {other!r} in the checkpoint: here {fact.built}"] if fact.checked else [])
        if fact.also:
            assert family.megatron_lm_problems(argparse.Namespace(**{**ns, attr: other, fact.also: value})) == []


SHAPES = [
    ModelShape(2, 64, 96, 4, 2, 16, 384, False, True),
    ModelShape(3, 48, 100, 6, 1, 24, 260, True, False),
    ModelShape(1, 32, 64, 4, 4, 8, 128, True, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa-tied", "mqa-qkln-untied", "mha-qkln"])
def test_parameter_counts_equal_the_weight_maps_tensors(shape):
    """ModelShape's counts (layers, embedding, final norm) add up to the tensors the HF weight map expects."""
    from megatron_dataeff.export.hf_mapping import megatron_shapes

    numel = {name: 1 for name in megatron_shapes(shape)}
    for name, dims in megatron_shapes(shape).items():
        for d in dims:
            numel[name] *= d
    layer0 = sum(n for name, n in numel.items() if name.startswith("decoder.layers.0."))
    matrices0 = sum(n for name, n in numel.items() if name.startswith("decoder.layers.0.") and "linear" in name)
    assert (matrices0, layer0 - matrices0) == (shape.layer_matrix_parameters, shape.layer_norm_parameters)
    assert numel["decoder.layers.0.self_attention.linear_qkv.weight"] == shape.qkv_rows * shape.hidden_size
    whole = shape.num_layers * (shape.layer_matrix_parameters + shape.layer_norm_parameters) \
        + shape.embedding_parameters * (1 if shape.tied else 2) + shape.final_norm_parameters
    assert sum(numel.values()) == whole


def test_per_rank_shape_divides_the_rows():
    """A tensor-parallel rank holds 1/TP of the heads, groups, FFN columns and embedding rows, hidden whole."""
    shape = ModelShape(2, 64, 96, 8, 4, 16, 384, True, False)
    rank = shape.per_rank(4)
    assert (rank.q_rows, rank.kv_rows, rank.ffn_hidden_size, rank.vocab_rows) == (32, 16, 24, 96)
    assert rank.layer_matrix_parameters * 4 == shape.layer_matrix_parameters
    assert rank.embedding_parameters * 4 == shape.embedding_parameters
    assert dataclasses.replace(rank, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
                               vocab_rows=384) == shape


def test_shape_from_a_run_config():
    """ModelShape reads a ModelConfig's sizes: kv_channels as head_dim, untied output as not tied."""
    cfg = config_from_args(build_parser().parse_args(["--num-query-groups", "2", "--qk-layernorm",
                                                      "--untie-embeddings-and-output-weights"]))
    shape = ModelShape.from_run_config(cfg, 384)
    m = cfg.model
    assert shape == ModelShape(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, 2,
                               m.kv_channels, 384, True, False)
