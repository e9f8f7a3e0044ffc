"""Training: models, the loop, data-parallel runs, checkpoints, devices and seeds."""
