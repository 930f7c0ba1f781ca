"""dcgan: distributed DCGAN training (DDP + SyncBatchNorm, WebDataset shards, DCP checkpoints, SLURM, wandb)."""

__version__ = "0.1.0"
