"""The training core: one pure train_step for every method, the optimizer, checkpoints, the loop."""
