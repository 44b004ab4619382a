"""Evaluate one checkpoint: validation loss (NLL or ELBO, with standard error) and offline tasks."""

from __future__ import annotations

import time
from typing import Optional, Sequence

from megatron_dataeff.evaluation.scoring import ModelScorer, check_greedy_order
from megatron_dataeff.evaluation.tasks import build_tasks, evaluate_tasks, validation_documents


def data_prefix_of(scorer: ModelScorer, data_path: Optional[str] = None) -> str:
    """The indexed dataset a checkpoint was trained on (or `data_path`)."""
    from megatron_dataeff.data.corpus import embedded_corpus

    if data_path:
        return data_path
    d = scorer.config.data
    paths = list(d.data_path)
    if not paths:
        return embedded_corpus(scorer.tokenizer, d.data_cache_dir)
    return paths[-1]  # "[weight] prefix": the prefix is last


def evaluate_checkpoint(path: str, *, iteration: Optional[int] = None, tasks: Sequence[str] = (),
                        mc_samples: int = 32, val_mc_samples: Optional[int] = None,
                        eval_windows: Optional[int] = None, num_examples: int = 200, task_seed: int = 1234,
                        data_path: Optional[str] = None, batch_size: int = 32, validation: bool = True,
                        method: str = "mc", greedy_order: str = "confidence") -> dict:
    """Everything `tools/evaluate.py --json` prints, as a dict."""
    from megatron_dataeff.data.samples import DataConstrainedData
    from megatron_dataeff.evaluation.validation import validation_loss

    check_greedy_order(greedy_order)  # before the checkpoint loads
    t0 = time.time()
    scorer = ModelScorer.from_checkpoint(path, iteration=iteration, batch_size=batch_size)
    cfg, meta = scorer.config, scorer.metadata
    prefix = data_prefix_of(scorer, data_path)
    out = {"checkpoint": path, "iteration": meta.get("iteration"), "epoch": meta.get("epoch"),
           "objective": cfg.objective.objective, "consumed_tokens": meta.get("consumed_samples", 0)
           * cfg.model.seq_length}
    if validation:
        data = DataConstrainedData(prefix, cfg.model.seq_length, cfg.data.split_weights, cfg.optim.seed)
        n_mc = val_mc_samples if val_mc_samples is not None else mc_samples
        out.update(validation_loss(scorer, data, eval_windows, mc_samples=n_mc))
    if tasks:
        docs = validation_documents(prefix, cfg.data.split_weights, scorer.tokenizer)
        built = build_tasks(docs, tasks, num_examples=num_examples, seed=task_seed,
                            max_length=scorer.max_length)
        for name, metrics in evaluate_tasks(scorer, built, mc_samples=mc_samples, method=method,
                                            greedy_order=greedy_order).items():
            for k, v in metrics.items():
                out[f"{name}_{k}"] = v
        if "cloze" in built:  # the order cloze_acc was decoded in (AR greedy is always left to right)
            out["greedy_order"] = greedy_order if scorer.diffusion else "l2r"
    out["seconds"] = round(time.time() - t0, 2)
    return out
