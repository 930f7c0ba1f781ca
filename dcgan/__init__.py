"""dcgan: distributed DCGAN training (DDP + cross-rank BatchNorm, WebDataset shards, DCP checkpoints, SLURM, wandb)."""

__version__ = "0.1.0"
