"""The model of a training checkpoint of any TP/PP layout, loaded at TP=PP=1 in this process."""

from __future__ import annotations

from megatron_dataeff.checkpoint.reading import inference_config
from megatron_dataeff.checkpoint.storage import load_sharded
from megatron_dataeff.models.builder import build_model
from megatron_dataeff.distributed import initialize


def load_model_for_inference(path: str, iteration: int | None = None, device: str = "cpu", dtype=None,
                             view: str | None = None):
    """(model, RunConfig, metadata): the model of a checkpoint of any TP/PP layout, in this process, in eval
    mode (in `dtype` when given).

    Starts a 1-process group at TP=PP=1 when none exists (dist_checkpointing reshards the saved
    layout into it). `path` is a `--save` directory or one `iter_N` directory.  A dual-objective
    checkpoint is two models with the same weights: `view` "ar" builds it causal (and the returned config
    says --objective ar), "mdm" bidirectional (--objective mdm).
    """
    ckpt, cfg, meta = inference_config(path, iteration, device, view)
    runtime = initialize(1, 1, cfg.optim.seed, device)
    model = build_model(cfg, meta["vocab_ids"], runtime.device, pre_process=True, post_process=True,
                        initialize=False)
    state = load_sharded({"model": model.sharded_state_dict()}, ckpt, "model")
    model.load_state_dict(state["model"])
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model, cfg, meta
