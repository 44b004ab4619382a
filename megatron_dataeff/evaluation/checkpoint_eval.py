"""Evaluate one checkpoint: validation loss (NLL or ELBO, with standard error) and offline tasks."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional, Sequence

from megatron_dataeff.checkpoint.format import read_metadata, resolve_checkpoint
from megatron_dataeff.config import RunConfig
from megatron_dataeff.data.blending import build_run_data, run_data_path
from megatron_dataeff.evaluation.scoring import ModelScorer, check_greedy_order
from megatron_dataeff.evaluation.tasks import build_tasks, evaluate_tasks, validation_documents
from megatron_dataeff.evaluation.validation import validation_loss
from megatron_dataeff.objectives import build_objective, objective_class


def checkpoint_data(scorer: ModelScorer, data_path: Optional[Sequence[str]] = None):
    """The data a checkpoint was trained and validated on, built by the trainer's own builder: its
    `--data-path` (every dataset of a blend, with its weights), or `data_path` (the same syntax) instead."""
    cfg = scorer.config
    if data_path:
        cfg = replace(cfg, data=replace(cfg.data, data_path=list(data_path)))
    return build_run_data(cfg, run_data_path(cfg, scorer.tokenizer))


def evaluate_checkpoint(path: str, *, iteration: Optional[int] = None, tasks: Sequence[str] = (),
                        mc_samples: int = 32, val_mc_samples: Optional[int] = None,
                        eval_windows: Optional[int] = None, num_examples: int = 200, task_seed: int = 1234,
                        data_path: Optional[Sequence[str]] = None, batch_size: int = 32, validation: bool = True,
                        method: str = "mc", greedy_order: str = "confidence", view: Optional[str] = None) -> dict:
    """Everything `tools/evaluate.py --json` prints, as a dict.  A dual-objective checkpoint is validated in
    both views (`val_loss_ar`, the NLL, is `val_loss`; `val_loss_mdm` the ELBO) and scored on the tasks as
    `view` (default ar).  The validation is the trainer's (`evaluation/validation.py`): the trained objective's
    views, each scored with the model built for it (a dual model's `ar` view causal)."""
    check_greedy_order(greedy_order)  # before the checkpoint loads
    t0 = time.time()
    trained = RunConfig.from_dict(read_metadata(resolve_checkpoint(path, iteration))["config"])
    views = objective_class(trained.objective).evaluation_views
    several = len(views) > 1  # a model of several views (dual): each validated, the tasks scored as `view`
    task_view = (view or views[0]) if several else view
    scorer = ModelScorer.from_checkpoint(path, iteration=iteration, batch_size=batch_size, view=task_view)
    cfg, meta = scorer.config, scorer.metadata
    data = checkpoint_data(scorer, data_path) if (validation or tasks) else None
    out = {"checkpoint": path, "iteration": meta.get("iteration"), "epoch": meta.get("epoch"),
           "objective": meta["config"]["objective"].get("name", cfg.objective.name),
           "consumed_tokens": meta.get("consumed_samples", 0) * cfg.model.seq_length}
    if validation:
        n_mc = val_mc_samples if val_mc_samples is not None else mc_samples
        scorers = {v: scorer if not several or v == task_view else
                   ModelScorer.from_checkpoint(path, iteration=iteration, batch_size=batch_size, view=v) for v in views}
        objective = build_objective(trained, scorer.mask_token_id, eod_token_id=scorer.eod_token_id)
        out.update(validation_loss(scorers, objective, data, eval_windows, mc_samples=n_mc))
    if tasks:
        docs = validation_documents(data, scorer.tokenizer)
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
