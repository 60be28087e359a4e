"""Launchers: `megamom launch` (torchrun on one node, keeping the trainer's exit codes) and the Slurm
batch scripts in `slurm/` (multi-node training with preemption and requeue, data prep job arrays).
See docs/launch.md."""
