"""Runtime helpers any layer may import: device and precision, distributed set-up, checkpoints, preemption."""
