"""The arithmetic of a data stream: how a run's shards are cut into partitions that every rank and
loader worker can share, how many steps an epoch holds, and which partition counts suit a range of world
sizes. Pure functions of counts: the same answers on every rank, with no file opened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dcgan.config import Config, ConfigError, divisors
from dcgan.data.base import check_batch_fits
from dcgan.data.remote import DEFAULT_RETRY, RetryPolicy
from dcgan.seeds import mix


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to produce its partitions' chunks of an epoch (picklable, no open handles)."""

    urls: list[str]
    counts: list[int] | None
    seed: int
    partitions: int
    mine: tuple[int, ...]
    """The partitions this rank serves, in order."""
    workers: int
    """Processes sharing `mine` (1 when data.workers=0: the training process reads them all)."""
    chunk: int
    """Images each partition gives per step: global_batch / partitions."""
    steps_per_epoch: int
    shuffle_buffer: int
    resampled: bool
    channels: int
    resolution: int
    retry: RetryPolicy = DEFAULT_RETRY
    """How long a read of an http(s) shard waits out a lost server (data.retries, data.timeout_s)."""

    def of_worker(self, worker: int) -> tuple[int, ...]:
        """The partitions worker `worker` reads (each partition by exactly one worker)."""
        return self.mine[worker :: self.workers]

    def dealt_shards(self, epoch: int, partition: int, deal: int = 0) -> list[int]:
        """The shard indices partition `partition` reads in deal `deal` of `epoch`: all shards shuffled
        (repeated, each copy shuffled anew, until every partition gets one) and dealt round the partitions.

        Exact mode reads deal 0 of each epoch and stops; resampled mode reads deal after deal, endlessly.
        An epoch thus reads every shard about once, where drawing shards with replacement would leave
        about 37% of them (1/e) unread each epoch and read about 26% twice. Deal 0 is seeded as exact
        mode's one deal always was, so exact-mode runs keep their data order."""
        copies = -(-self.partitions // len(self.urls))
        rng = random.Random(mix(self.seed, epoch, 0x5EED) if deal == 0 else mix(self.seed, epoch, 0x5EED, deal))
        order: list[int] = []
        for _ in range(copies):
            shuffled = list(range(len(self.urls)))
            rng.shuffle(shuffled)
            order += shuffled
        return order[partition :: self.partitions]


def partitions_fit(partitions: int, global_batch: int, world_size: int) -> bool:
    """Whether `world_size` ranks can share `partitions` evenly, each giving a whole share of the batch."""
    return partitions % world_size == 0 and global_batch % partitions == 0


def most_partitions(base: int, workers: int, global_batch: int) -> int:
    """The largest multiple of `base` (the rank counts to be served: their least common multiple) by at
    most `workers` that divides the global batch: as many streams as the loader has workers, where they
    fit. `base` itself always fits where each rank count divides the global batch."""
    return base * max(k for k in range(1, max(workers, 1) + 1) if global_batch % (base * k) == 0)


def resolve_partitions(config: Config, world_size: int, workers: int) -> int:
    """data.partitions, or (0) the number chosen at a run's start: ranks x workers, fewer where that does
    not divide the global batch. Refused in one line where the ranks cannot share them or a partition's
    share of the global batch is not whole."""
    global_batch = config.global_batch(world_size)
    partitions = config.data.partitions
    if not partitions:
        return most_partitions(world_size, workers, global_batch)
    if partitions % world_size:
        fitting = [str(n) for n in divisors(partitions)]
        raise ConfigError(
            f"data.partitions: the run reads its shards in {partitions} partitions (kept in its checkpoints), which "
            f"{world_size} ranks cannot share: run on {', '.join(fitting)} rank(s), or set data.partitions to a "
            f"multiple of {world_size} that divides the global batch of {global_batch} (the data order then changes)"
        )
    if global_batch % partitions:
        raise ConfigError(
            f"data.partitions: {partitions} partitions cannot share a global batch of {global_batch} images "
            "evenly: use a divisor of the global batch"
        )
    return partitions


def epoch_steps(plan: StreamPlan, epoch_samples: int) -> int:
    """Steps per epoch: a function of the data and the global batch only, the same on every rank and
    for any number of ranks, so DDP never waits on a missing batch and a resize keeps the epochs."""
    global_batch = plan.chunk * plan.partitions
    if not plan.resampled:
        if plan.counts is None:
            raise ConfigError(
                "data.resampled=false needs per-shard sample counts: point data.shards at a directory with manifest.json"
            )
        # the deal changes every epoch: bound each partition's share by the smallest shards it could get
        smallest = sum(sorted(plan.counts)[: len(plan.urls) // plan.partitions])
        check_batch_fits(
            global_batch,
            smallest * plan.partitions,
            f"what the partitions surely hold in exact mode ({plan.partitions} x {smallest}, data.resampled=false)",
        )
        return smallest // plan.chunk
    if epoch_samples:
        samples, holds = epoch_samples, f"data.epoch_samples ({epoch_samples})"
    elif plan.counts is not None:
        samples, holds = sum(plan.counts), f"the shards ({sum(plan.counts)} images)"
    else:
        raise ConfigError("data.epoch_samples: must be > 0 when the shards have no manifest (URLs or patterns)")
    check_batch_fits(global_batch, samples, holds)
    return samples // global_batch
