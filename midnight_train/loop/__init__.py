"""The training loop and what it delegates to: run folder, distribution, checkpoints, signals."""
