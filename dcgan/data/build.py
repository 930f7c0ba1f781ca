"""Data sources for training: the built-in digits or WebDataset shards, behind one interface."""

from __future__ import annotations

from dcgan.config import Config
from dcgan.data.base import BatchSource
from dcgan.distributed.env import DistInfo


def build_source(config: Config, info: DistInfo) -> BatchSource:
    """The batch source this rank trains on, chosen by `data.shards` (empty = built-in digits); a world
    size that cannot share train.global_batch is refused here, before any work."""
    config.batch_per_rank(info.world_size)
    if config.uses_builtin_digits:
        from dcgan.data.digits import DigitsSource

        return DigitsSource(
            config.model.resolution, config.global_batch(info.world_size), config.seed, info.rank, info.world_size
        )
    from dcgan.data.stream import ShardSource

    return ShardSource(config, info)
