"""Training: the Trainer, its callbacks and checkpoints, and the `adaptune train` job."""
