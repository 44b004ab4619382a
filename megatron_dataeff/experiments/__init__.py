"""Experiments: the paper's ablation grid (methods, scales, flags of each run) and its reports (tables,
loss-curve plots, effective-data fits over a grid's runs)."""
