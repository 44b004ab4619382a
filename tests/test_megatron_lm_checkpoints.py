"""Megatron-LM torch_dist checkpoints: ours written in its layout, and its read by `--load` (weights, any
objective), with architectures and shapes we do not build refused by Megatron-LM's flag names.

The checkpoint "Megatron-LM wrote" here is the one tools/export_megatron_lm.py writes (megatron-core's
sharded model plus Megatron-LM's `args` Namespace in the common state), edited where a test needs another
architecture.  With MEGATRON_LM_DIR set (a Megatron-LM checkout at core_v0.16.1), Megatron-LM's own
checkpointing code writes and reads them too.
"""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, child_env, losses, train_in_process

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "1", "--eval-iters", "0"]


@pytest.fixture(scope="module")
def ours(megatron_cpu, tmp_path_factory):
    """A trained AR checkpoint of ours and its Megatron-LM form."""
    from tools.export_megatron_lm import main

    root = tmp_path_factory.mktemp("megatron_lm")
    train_in_process(TINY + ["--train-iters", "3", "--lr-decay-iters", "3", "--save", str(root / "ours")],
                     root / "run")
    assert main(["--load", str(root / "ours"), "--save", str(root / "mlm")]) == 0
    return root


def _common(path):
    from megatron_dataeff.checkpoint.format import read_common_state

    return read_common_state(str(path / "release"))


def _edited(ours, tmp_path, **changes):
    """A copy of the Megatron-LM checkpoint whose args have `changes`."""
    import shutil

    shutil.copytree(ours / "mlm", tmp_path / "mlm")
    common = _common(tmp_path / "mlm")
    for key, value in changes.items():
        setattr(common["args"], key, value)
    torch.save(common, tmp_path / "mlm" / "release" / "common.pt")
    return str(tmp_path / "mlm")


def test_written_in_megatron_lm_layout(ours):
    """SAVE/release with Megatron-LM's tracker, args, version and the model under megatron-core's keys."""
    from megatron_dataeff.checkpoint.storage import checkpoint_keys

    assert (ours / "mlm" / "latest_checkpointed_iteration.txt").read_text() == "release"
    common = _common(ours / "mlm")
    args = common["args"]
    assert isinstance(args, argparse.Namespace) and common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.group_query_attention) == (2, 64, 2, True)
    assert (args.normalization, args.swiglu, args.add_bias_linear, args.position_embedding_type) == (
        "RMSNorm", True, False, "rope")
    assert args.padded_vocab_size == 384 and args.no_save_optim and args.no_save_rng
    keys = checkpoint_keys(str(ours / "mlm" / "release"))
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys and not any(
        k.startswith("optimizer") for k in keys)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_load_reads_megatron_lm_weights_for_any_objective(ours, tmp_path, objective):
    """--load of the Megatron-LM checkpoint trains from the same weights as --load of ours with --finetune
    (identical losses from iteration 1), AR or adapted to masked diffusion."""
    flags = TINY + ["--train-iters", "2", "--lr-decay-iters", "2", "--objective", objective]
    theirs = train_in_process(flags + ["--load", str(ours / "mlm")], tmp_path / "theirs")
    mine = train_in_process(flags + ["--load", str(ours / "ours"), "--finetune"], tmp_path / "mine")
    assert [r["iteration"] for r in theirs if r["split"] == "train"] == [1, 2]
    assert losses(theirs) == losses(mine)


@pytest.mark.parametrize("changes, message", [
    ({"normalization": "LayerNorm"}, "--normalization 'LayerNorm' in the checkpoint: here norms are RMSNorm"),
    ({"add_bias_linear": True}, "--disable-bias-linear True"),
    ({"num_experts": 8}, "--num-experts 8"),
    ({"num_layers": 3}, "--num-layers: checkpoint 3, this run 2"),
    ({"padded_vocab_size": 512, "tensor_model_parallel_size": 2, "make_vocab_size_divisible_by": 256},
     "embedding rows: checkpoint 512 .*x TP 2.*this run 384"),
    ({"tokenizer_type": "GPT2BPETokenizer"}, "--tokenizer-type: checkpoint GPT2BPETokenizer, this run ByteTokenizer"),
])
def test_other_architectures_are_refused_by_flag(ours, tmp_path, changes, message):
    """A Megatron-LM checkpoint of a model this framework does not build is refused before loading, naming
    Megatron-LM's flag."""
    from megatron_dataeff.checkpoint.format import CheckpointError

    ckpt = _edited(ours, tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        train_in_process(TINY + ["--train-iters", "1", "--load", ckpt], tmp_path / "run")


def test_a_checkpoint_without_args_is_refused(ours, tmp_path):
    """A torch_dist checkpoint with neither our metadata nor Megatron-LM's args is refused, naming both."""
    from megatron_dataeff.checkpoint.format import CheckpointError

    ckpt = _edited(ours, tmp_path)
    common = _common(tmp_path / "mlm")
    del common["args"]
    torch.save(common, tmp_path / "mlm" / "release" / "common.pt")
    with pytest.raises(CheckpointError, match="missing megatron_dataeff.json; neither a complete megatron_dataeff "
                                              "checkpoint nor a Megatron-LM one"):
        train_in_process(TINY + ["--train-iters", "1", "--load", ckpt], tmp_path / "run")


def test_diffusion_checkpoints_are_not_written_for_megatron_lm(megatron_cpu, tmp_path):
    """A masked-diffusion model is bidirectional: refused, not written as a causal GPT."""
    from tools.export_megatron_lm import main

    train_in_process(TINY + ["--objective", "mdm", "--train-iters", "1", "--lr-decay-iters", "1",
                             "--save", str(tmp_path / "mdm")], tmp_path / "run")
    assert main(["--load", str(tmp_path / "mdm"), "--save", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "release").exists()


def test_megatron_lm_checkpoint_is_refused_by_inference_tools_with_the_way_forward(ours):
    """Export/evaluation need our metadata: a Megatron-LM checkpoint is refused saying what reads it."""
    from megatron_dataeff.inference.loading import load_model_for_inference
    from megatron_dataeff.checkpoint.format import CheckpointError

    with pytest.raises(CheckpointError, match="is a Megatron-LM checkpoint: pretrain_diffusion.py --load reads"):
        load_model_for_inference(str(ours / "mlm"))


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
needs_megatron_lm = pytest.mark.skipif(not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR to a Megatron-LM checkout "
                                                                  "(core_v0.16.1)")
TOKENS = torch.arange(32)[None] % 200  # what tests/megatron_lm_side.py runs its model on


def _megatron_lm_side(*argv, cwd):
    """tests/megatron_lm_side.py: Megatron-LM's own checkpointing code, in a child process."""
    env = {k: v for k, v in child_env().items() if not k.startswith("NVTE_")}  # Megatron-LM sets its own
    env["PYTHONPATH"] = f"{MEGATRON_LM_DIR}{os.pathsep}{ROOT}"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "megatron_lm_side.py"), *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(TOKENS, torch.arange(32)[None], None)


@needs_megatron_lm
def test_megatron_lm_loads_ours_strictly(ours, tmp_path):
    """Megatron-LM's load_args_from_checkpoint (--use-checkpoint-args) and load_checkpoint (strict) read our
    export; the model it builds from the checkpoint's args computes our model's logits."""
    from megatron_dataeff.inference.loading import load_model_for_inference

    out = _megatron_lm_side("read", str(ours / "mlm"), str(tmp_path), cwd=tmp_path)
    assert "megatron-lm loaded iteration 0: 2 layers, hidden 64, RMSNorm, padded vocab 384" in out
    model, _, _ = load_model_for_inference(str(ours / "ours"))
    assert (torch.load(tmp_path / "logits.pt") - _logits(model)).abs().max().item() <= 1e-5


@needs_megatron_lm
def test_load_reads_a_checkpoint_megatron_lm_wrote(megatron_cpu, tmp_path):
    """A checkpoint written by Megatron-LM's generate_state_dict from pretrain_gpt.py's args and model (GPT2BPE
    tokenizer, untied, GQA) loads with --load; our model computes its logits."""
    from megatron_dataeff.arguments import build_parser, config_from_args
    from megatron_dataeff.training.loop import Trainer

    _megatron_lm_side("write", str(tmp_path / "mlm"), str(ROOT / "tests" / "assets" / "tokenizers" / "bpe"),
                      cwd=tmp_path)
    bpe = ROOT / "tests" / "assets" / "tokenizers" / "bpe"
    cfg = config_from_args(build_parser().parse_args(
        TINY + ["--untie-embeddings-and-output-weights", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                str(bpe / "vocab.json"), "--merge-file", str(bpe / "merges.txt"), "--load", str(tmp_path / "mlm"),
                "--train-iters", "1", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--tensorboard-dir", ""]))
    trainer = Trainer(cfg)
    try:
        assert trainer.state.iteration == 0
        err = (torch.load(tmp_path / "mlm" / "logits.pt") - _logits(trainer.model[0].module)).abs().max().item()
    finally:
        trainer.close()
    assert err <= 1e-5
