"""transformer-engine and local layer specs read each other's checkpoints (model only and full resume).

A GPU run with transformer-engine writes what the local spec writes (megatron-core's local spec stores its
norms under TE's names), plus TE's own `_extra_state` objects: FP8 metadata in every linear layer and one
for the core attention, which the local spec does not have.  There is no transformer-engine on a CPU, so the
TE checkpoint here is the local spec's state written in TE's form (`_as_transformer_engine`), and a TE model's
request is the local spec's request with TE's extra objects added.
"""

import dataclasses
import json

import pytest
import torch

from tests.conftest import losses, train_in_process

FLAGS = ["--train-iters", "4", "--log-interval", "1", "--eval-iters", "0", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--seq-length", "32", "--num-layers", "2", "--lr-decay-iters", "4",
         "--hidden-dropout", "0.1"]
TE_BLOB = b"transformer-engine fp8 metadata"  # what TE's get_extra_state serialises


def _as_transformer_engine(sharded: dict) -> dict:
    """A sharded state dict as a TE model's: TE's FP8 metadata in each `_extra_state`, and the core attention's."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model = {}
    for name, obj in sharded["model"].items():
        if isinstance(obj, ShardedObject) and name.endswith("_extra_state"):
            obj = dataclasses.replace(obj, data=torch.frombuffer(bytearray(TE_BLOB), dtype=torch.uint8))
            if name.endswith("self_attention.linear_qkv._extra_state"):
                core = name.replace("linear_qkv", "core_attention")
                model[core] = dataclasses.replace(obj, key=obj.key.replace("linear_qkv", "core_attention"))
        model[name] = obj
    return {**sharded, "model": model}


def _train(tmp_path, name, extra=(), te_form=None, monkeypatch=None):
    """Train in this process (with the checkpoint state in TE's form when `te_form`); the train losses."""
    from megatron_dataeff.checkpoint import state
    from megatron_dataeff.training.loop import Trainer

    if te_form:
        original = state.sharded_state
        monkeypatch.setattr(state, "sharded_state", lambda *a, **k: _as_transformer_engine(original(*a, **k)))
        if te_form == "save":  # and the run's compute config as a TE GPU run records it
            meta = Trainer.checkpoint_metadata

            def te_metadata(trainer):
                out = meta(trainer)
                out["config"]["compute"].update(attention_backend="fused", transformer_impl="transformer_engine")
                return out
            monkeypatch.setattr(Trainer, "checkpoint_metadata", te_metadata)
        else:  # a TE model loads what it asked for: its core attention's object comes back as its own value
            from megatron_dataeff.models.builder import DataEffGPTModel

            load_state_dict = DataEffGPTModel.load_state_dict

            def te_load(model, state, *args, **kwargs):
                core = {k: state.pop(k) for k in list(state) if "core_attention._extra_state" in k}
                assert len(core) == 2 and all(bytes(v.numpy()) == TE_BLOB for v in core.values())
                return load_state_dict(model, state, *args, **kwargs)
            monkeypatch.setattr(DataEffGPTModel, "load_state_dict", te_load)
    try:
        return losses(train_in_process(FLAGS + list(extra), tmp_path / name))
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.mark.parametrize("direction", ["te-to-local", "local-to-te"])
def test_checkpoints_cross_layer_specs_with_exact_resume(megatron_cpu, tmp_path, monkeypatch, direction):
    """Saved by one spec at iteration 2, resumed by the other: the losses of an uninterrupted run, bit for bit
    (model, distributed optimizer, RNG); TE's extra objects are ignored by the local spec and kept as they are
    by a TE model that finds none."""
    from megatron_dataeff.checkpoint.storage import checkpoint_keys

    extra = ["--use-distributed-optimizer"]
    full = _train(tmp_path, "full", extra)
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "2", "--exit-interval", "2"]
    _train(tmp_path, "first", extra + save, te_form="save" if direction == "te-to-local" else None,
           monkeypatch=monkeypatch)
    keys = checkpoint_keys(str(tmp_path / "ckpt" / "iter_0000002"))
    assert ("decoder.layers.self_attention.core_attention._extra_state" in keys) == (direction == "te-to-local")
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys  # the norms: one name in both
    resumed = _train(tmp_path, "second", extra + ["--load", str(tmp_path / "ckpt")],
                     te_form="load" if direction == "local-to-te" else None, monkeypatch=monkeypatch)
    assert resumed == full[2:]


def test_te_checkpoint_loads_for_inference_and_export_on_cpu(megatron_cpu, tmp_path, monkeypatch):
    """A TE run's checkpoint (TE objects, --attention-backend fused recorded) is read on a CPU: loaded for
    inference with a backend this machine has, and exported to HF with the same logits."""
    from megatron_dataeff.export.hf_export import export_checkpoint
    from tests.test_export_hf import TOKENS, hf_logits, megatron_logits

    _train(tmp_path, "te", ["--save", str(tmp_path / "ckpt")], te_form="save", monkeypatch=monkeypatch)
    meta = json.load(open(tmp_path / "ckpt" / "iter_0000004" / "megatron_dataeff.json"))
    assert meta["config"]["compute"]["attention_backend"] == "fused"
    out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="fp32")
    _, got = hf_logits(out, TOKENS)
    assert (got - megatron_logits(str(tmp_path / "ckpt"), TOKENS)).abs().max().item() <= 1e-4


def test_a_key_the_checkpoint_lacks_is_refused_by_name(megatron_cpu, tmp_path, monkeypatch):
    """A request for a tensor the checkpoint does not hold fails before any load, naming the key."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_dataeff.checkpoint.format import CheckpointError
    from megatron_dataeff.checkpoint.storage import fit_request

    _train(tmp_path, "run", ["--save", str(tmp_path / "ckpt"), "--train-iters", "1", "--lr-decay-iters", "1"])
    extra = ShardedTensor.from_rank_offsets("decoder.layers.self_attention.linear_qkv.bias", torch.zeros(4),
                                            replica_id=0)
    with pytest.raises(CheckpointError, match=r"iter_0000001 has no decoder\.layers\.self_attention\.linear_qkv\.bias"):
        fit_request({"model": {"bias": extra}}, str(tmp_path / "ckpt" / "iter_0000001"))
