"""The loader interface every data source implements, and the position bookkeeping that makes resume exact.

A source is an endless stream of uint8 batches (N, C, H, W) on the host, cut into epochs. Its whole
position is (epoch, batches already taken in that epoch): every epoch's order is a pure function of
(seed, epoch) and the data, and a rank's batch is its slice of the global batch, so a resumed run, on
any number of ranks, replays an epoch's order and skips the steps already trained on, and sees exactly
the stream an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from dcgan.config import ConfigError
from dcgan.errors import ShardError


class BatchSource(Protocol):
    """What the training loop needs from data: batches, a resumable position, and counts of bad samples
    and of reconnections to shard servers."""

    batches_per_epoch: int

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...

    @property
    def skipped_samples(self) -> int: ...

    @property
    def shard_retries(self) -> int: ...

    def close(self) -> None: ...


def check_batch_fits(
    global_batch: int, available: int, holds: str, advice: str = "use a smaller train.global_batch or train.batch_size"
) -> None:
    """A step's global batch must fit in the images one epoch reads: the one check, and its one line, of
    every source. `holds` says what holds how many ("the shards hold 1797 per epoch"), giving
    "the global batch of 4000 images is larger than the shards hold (1797 per epoch): use a smaller ..."."""
    if global_batch > available:
        raise ConfigError(f"the global batch of {global_batch} images is larger than {holds}: {advice}")


EpochFactory = Callable[[int, int], Iterator[torch.Tensor]]
"""(epoch, batches to skip) -> that epoch's remaining batches."""


class EpochStream:
    """Chains epochs from a factory and tracks the position of the next batch to hand out."""

    def __init__(self, make_epoch: EpochFactory, batches_per_epoch: int) -> None:
        self._make_epoch = make_epoch
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.batch = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            for images in self._make_epoch(self.epoch, self.batch):
                if self.batch >= self.batches_per_epoch:
                    break
                self.batch += 1
                yield images
            if self.batch < self.batches_per_epoch:
                raise ShardError(
                    f"epoch {self.epoch} ended after {self.batch} of {self.batches_per_epoch} batches: "
                    "the data source yielded fewer batches than it promised (corrupt samples in the exact "
                    "mode shorten an epoch: use data.resampled=true for training)"
                )
            self.epoch += 1
            self.batch = 0

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch (an epoch's end is reported as the next epoch's start)."""
        if self.batch >= self.batches_per_epoch:
            return {"epoch": self.epoch + 1, "batch": 0}
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def close(self) -> None:
        """Release worker processes or files (nothing to do for in-memory sources)."""
