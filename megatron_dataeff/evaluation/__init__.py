"""Evaluation: validation NLL / ELBO, multiple-choice likelihood, offline tasks, lm-eval adapter,
effective-data fits."""
