"""Data sources for training: the built-in digits or WebDataset shards, behind one interface."""

from __future__ import annotations

import torch

from dcgan.config import Config
from dcgan.data.base import BatchSource
from dcgan.distributed import DistInfo


def build_source(config: Config, info: DistInfo) -> BatchSource:
    """The batch source this rank trains on, chosen by `data.shards` (empty = built-in digits)."""
    if config.uses_builtin_digits:
        from dcgan.data.digits import DigitsSource

        return DigitsSource(
            config.model.resolution, config.train.batch_size, config.seed, info.rank, info.world_size
        )
    from dcgan.data.stream import ShardSource

    return ShardSource(config, info)


def check_source(config: Config, world_size: int) -> None:
    """Build and close rank 0's source of a run of `world_size` ranks: what a source refuses (a batch
    larger than a rank's share of the data, shards that are missing or do not match the model) is
    refused in one line before the run creates or locks anything; no worker process is started."""
    build_source(config, DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))).close()
