"""Data sources for training: the built-in digits or WebDataset shards, behind one interface."""

from __future__ import annotations

from dcgan.config import Config
from dcgan.data.base import BatchSource
from dcgan.distributed import DistInfo


def build_source(config: Config, info: DistInfo) -> BatchSource:
    """The batch source this rank trains on, chosen by `data.shards` (empty = built-in digits)."""
    if config.uses_builtin_digits:
        from dcgan.data.digits import DigitsSource

        return DigitsSource(config.model.resolution, config.train.batch_size, config.seed, info.rank, info.world_size)
    from dcgan.data.stream import ShardSource

    return ShardSource(config, info)
