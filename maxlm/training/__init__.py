"""Training machinery: the Trainer (step and loop), pretraining, optimizer, checkpoints, sharding,
multi-host start-up, metrics."""
