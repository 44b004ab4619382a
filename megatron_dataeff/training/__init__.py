"""Training: distributed set-up, optimizer and schedule, the loop, metrics, checkpoints."""
