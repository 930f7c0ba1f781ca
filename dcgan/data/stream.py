"""Streaming WebDataset shards to many ranks, resumable to the exact batch, in an order that does not
depend on the number of ranks or loader workers.

The data order is a function of (seed, step) and the shards alone. A run reads its shards in P
*partitions* (`data.partitions`, fixed when the run starts and kept in its checkpoints' config): each an
independent seeded stream of samples with its own shuffle buffer, and every step each partition gives
global_batch / P images, so the global batch of step k is the same multiset of images on any number of
ranks. Rank r serves partitions [r P/W, (r+1) P/W) and reads only their shards; its DataLoader workers
split those partitions among them (each partition is read by exactly one worker) and write each step's
chunks straight into their places, in partition order, in a ring of batches in shared memory; the
training process copies a step's batch out once every worker has written its part. Per epoch e,
partition p:
- exact mode (data.resampled=false): the shard list is shuffled by (seed, e) and dealt to the partitions;
  every sample is seen at most once per epoch, and an epoch ends with its shortest partition;
- resampled mode (default): the same deal, followed by further deals (seeded by (seed, e, deal)) for as
  long as the epoch lasts: an endless stream, so every step takes a full chunk from every partition
  (uneven batches would hang DDP and cross-rank BN), that still reads every shard about once an epoch.
Samples pass through the partition's shuffle buffer before they are decoded. A resume at step k of an
epoch makes every partition skip k chunks of its stream, on whatever number of ranks and workers, and so
continues the stream an uninterrupted run would have seen (for data without corrupt per-sample images:
a skipped sample is counted when decoded, not while skipping).

Images stay uint8 on the host (pinned when training on CUDA) and are normalized on the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan.config import Config, ConfigError
from dcgan.data.base import EpochStream
from dcgan.data.formats import IMAGE_EXTENSIONS, READ_BUFFER, CorruptSample, decode_block, decode_image, verify_checksum
from dcgan.data.partitions import StreamPlan, epoch_steps, resolve_partitions
from dcgan.data.remote import DEFAULT_RETRY, RetryPolicy, is_http, shard_samples, uncounted
from dcgan.data.shards import check_shape, raise_naming_shard, resolve_shards
from dcgan.distributed.env import DistInfo
from dcgan.errors import ShardError
from dcgan.seeds import mix

log = logging.getLogger(__name__)


StepDone = tuple[int, int, int]
"""What a worker hands over per step: the step (in its epoch) whose chunks it has written into the ring,
and since its previous step the samples skipped as undecodable and its reconnections to shard servers.
No tensor crosses: a tensor per step would cost the hand-over a new shared-memory segment, its page
faults and a file descriptor."""

RING_SLACK = 3
"""Ring slots beyond data.prefetch: a worker is never asked for more than `prefetch` steps beyond the
newest one the training process has received (the DataLoader hands it one new request per item
received), and that step is copied out of its slot before another is asked for, so prefetch + 2
slots are never overwritten while in use; one more for margin."""


class PartitionDataset(IterableDataset):
    """The rank's partitions for one epoch, a step at a time, each worker writing its partitions' chunks
    into the step's slot of a ring of batches in shared memory (allocated once: no segment per step).
    The main process sets (epoch, start) in shared memory before each epoch; persistent workers read it
    when their iterator is re-created."""

    def __init__(self, plan: StreamPlan, slots: int) -> None:
        super().__init__()
        self.plan = plan
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, start step
        shape = (slots, len(plan.mine), plan.chunk, plan.channels, plan.resolution, plan.resolution)
        self.ring = torch.empty(shape, dtype=torch.uint8).share_memory_()

    def set_epoch(self, epoch: int, start: int) -> None:
        self.control[0], self.control[1] = epoch, start

    def batch(self, step: int) -> torch.Tensor:
        """The rank's batch of `step` as the workers wrote it: a view, valid until the ring comes round."""
        return self.ring[step % len(self.ring)].flatten(0, 1)

    def __iter__(self) -> Iterator[StepDone]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start = (int(v) for v in self.control)
        partitions = self.plan.of_worker(worker) if info is not None else self.plan.mine
        yield from worker_steps(self.plan, epoch, partitions, start, self.ring)


def worker_steps(
    plan: StreamPlan, epoch: int, partitions: tuple[int, ...], start: int, ring: torch.Tensor
) -> Iterator[StepDone]:
    """Steps start.. of an epoch from `partitions`: each step one chunk of every partition, written
    into the step's slot of `ring` at the partitions' places (the images are copied once)."""
    bad = BadSamples()
    streams = [partition_chunks(plan, epoch, p, start, bad) for p in partitions]
    places = [p - plan.mine[0] for p in partitions]
    slots = ring.numpy()
    for step in range(start, plan.steps_per_epoch):
        slot = slots[step % len(slots)]
        for place, stream in zip(places, streams, strict=True):
            chunk = next(stream, None)
            if chunk is None:
                return
            for index, image in enumerate(chunk):
                slot[place, index] = image
        yield step, bad.since_batch, bad.retries
        bad.since_batch = bad.retries = 0


def _shard_stream(plan: StreamPlan, epoch: int, partition: int) -> Iterator[dict[str, str]]:
    """The shards a partition reads in an epoch: one deal (exact mode), or deal after deal (resampled)."""
    for deal in itertools.count() if plan.resampled else range(1):
        for index in plan.dealt_shards(epoch, partition, deal):
            yield {"url": plan.urls[index]}


CONSECUTIVE_BAD_LIMIT = 200
"""Undecodable samples (or blocks) in a row after which a partition stops the run: shards of another shape
or wholly damaged ones would otherwise be skipped forever without a step ever completing."""

WARNED_BAD_BLOCKS = 5
"""Corrupt blocks a worker names in the log; the rest are only counted (skipped_samples)."""


@dataclass
class BadSamples:
    """A worker's undecodable samples: counted for stats.jsonl, bounded when they come in a row."""

    since_batch: int = 0
    in_a_row: int = 0
    warned: int = 0
    retries: int = 0
    """Reconnections to a shard server since the previous step (http shards): counted like the skips."""

    def retried(self) -> None:
        self.retries += 1

    def warn(self, message: str, *args: object) -> None:
        """Log the first WARNED_BAD_BLOCKS problems of a worker; the rest are only counted."""
        if self.warned < WARNED_BAD_BLOCKS:
            self.warned += 1
            log.warning(message, *args)

    def skip(self, reason: str, url: str, images: int = 1) -> None:
        """One undecodable sample (or block, counting `images`, 0 when the shard's shortfall counts it)."""
        self.since_batch += images
        self.in_a_row += 1
        if self.in_a_row >= CONSECUTIVE_BAD_LIMIT:
            raise ShardError(
                f"{self.in_a_row} samples in a row could not be decoded (last in {url}: {reason}): the shards "
                "do not match model.resolution/model.channels, or they are damaged"
            )

    def good(self) -> None:
        self.in_a_row = 0


END_OF_SHARD = "__end_of_shard__"


def shard_passes(
    shards: Iterator[dict[str, str]], retry: RetryPolicy = DEFAULT_RETRY, on_retry: Callable[[], None] = uncounted
) -> Iterator[dict[str, Any]]:
    """Samples of each shard in turn, each pass followed by an END_OF_SHARD marker (the same shard may
    be drawn twice in a row, so a change of URL cannot mark the end of a pass). Set here, in the process
    that reads (a loader worker, or training itself): the read buffer, unless the user chose one.
    http(s) shards are read by dcgan.data.remote (resumed after a dropped connection, `on_retry` called
    per reconnection), everything else by webdataset's gopen."""
    os.environ.setdefault("GOPEN_BUFFER", str(READ_BUFFER))
    for shard in shards:
        if is_http(shard["url"]):
            yield from shard_samples(shard["url"], retry, on_retry, raise_naming_shard)
        else:
            yield from wds.tarfile_to_samples(handler=raise_naming_shard)(iter([shard]))
        yield {END_OF_SHARD: shard["url"]}


def decoded_samples(samples: Iterator[dict[str, Any]], plan: StreamPlan, bad: BadSamples) -> Iterator[Any]:
    """Blocks -> one uint8 image each; per-sample formats stay encoded bytes (with their shard's URL)
    until after the shuffle. At the end of each shard, what it yielded is compared with its manifest
    count: Python's tarfile stops silently at a damaged header, and a damaged block hides how many
    images it held, so the shortfall is what counts them."""
    expected = dict(zip(plan.urls, plan.counts, strict=True)) if plan.counts is not None else {}
    yielded = 0
    for sample in samples:
        if END_OF_SHARD in sample:
            url = sample[END_OF_SHARD]
            missing = expected.get(url, yielded) - yielded
            if missing > 0:
                bad.since_batch += missing
                bad.warn(
                    "shard %s yielded %d of its %d images: %d counted as skipped (damaged blocks, or a "
                    "damaged tar header after which nothing more can be read)",
                    url,
                    yielded,
                    expected[url],
                    missing,
                )
            yielded = 0
            continue
        url = str(sample.get("__url__", "?"))
        if "images.npy" in sample:
            try:
                verify_checksum(sample, "images.npy")
                block = decode_block(sample["images.npy"], plan.channels, plan.resolution)
            except CorruptSample as exc:
                bad.warn("skipping corrupt block %s in %s: %s", sample.get("__key__"), url, exc)
                bad.skip(str(exc), url, images=0 if url in expected else 1)
                continue
            bad.good()
            yielded += len(block)
            yield from block
            continue
        ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if ext is None:  # e.g. a sample cut short by a damaged header: the shard's shortfall counts it
            bad.skip("no image member", url, images=0 if url in expected else 1)
            continue
        yielded += 1  # an image member that fails to decode later is counted then
        try:
            verify_checksum(sample, ext)
        except CorruptSample as exc:
            bad.warn("skipping damaged sample %s in %s: %s", sample.get("__key__"), url, exc)
            bad.skip(str(exc), url)
            continue
        yield (sample[ext], url)


class ShardSource(EpochStream):
    """The shard loader behind the training loop's BatchSource interface."""

    def __init__(self, config: Config, info: DistInfo, *, pin_memory: bool | None = None) -> None:
        shards = resolve_shards(config.data.shards, config.data.timeout_s)
        self.shards = shards
        check_shape(shards, config)
        d = config.data
        global_batch = config.global_batch(info.world_size)
        partitions = resolve_partitions(config, info.world_size, d.workers)
        per_rank = partitions // info.world_size
        if not d.resampled and len(shards.urls) < partitions:
            raise ConfigError(
                f"data.shards: {len(shards.urls)} shards cannot feed {partitions} partitions in exact mode "
                "(data.resampled=false): write more, smaller shards (dcgan shards --shard-size), use fewer "
                "data.partitions, or set data.resampled=true"
            )
        plan = StreamPlan(
            urls=shards.urls,
            counts=shards.counts,
            seed=config.seed,
            partitions=partitions,
            mine=tuple(range(info.rank * per_rank, (info.rank + 1) * per_rank)),
            workers=min(max(d.workers, 1), per_rank),
            chunk=global_batch // partitions,
            steps_per_epoch=0,
            shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled,
            channels=config.model.channels,
            resolution=config.model.resolution,
            retry=RetryPolicy(retries=d.retries, timeout_s=d.timeout_s),
        )
        plan = dataclasses.replace(plan, steps_per_epoch=epoch_steps(plan, d.epoch_samples))
        self.plan = plan
        self.dataset = PartitionDataset(plan, slots=d.prefetch + RING_SLACK)
        self.pin = info.device.type == "cuda" if pin_memory is None else pin_memory
        workers = plan.workers if d.workers > 0 else 0
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=d.prefetch if workers > 0 else None,
            # forkserver: workers start from a clean process, not a fork of one that holds CUDA/NCCL
            # threads or other loaders (a forked child that garbage-collects an inherited loader
            # iterator shuts down the parent's workers).
            multiprocessing_context="forkserver" if workers > 0 else None,
        )
        self._skipped = self._retries = 0
        super().__init__(self._epoch, plan.steps_per_epoch)

    def _epoch(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        """The rank's batches: a step is done once every worker has handed over its word for it (the
        DataLoader takes them in turn); the batch is then copied out of the ring (into pinned memory
        for a GPU), so that the caller owns it while the workers go on."""
        self.dataset.set_epoch(epoch, start)
        items = iter(self.loader)
        parts_per_step = max(self.loader.num_workers, 1)
        while True:
            done = list(itertools.islice(items, parts_per_step))
            if len(done) < parts_per_step:
                return
            steps = {step for step, _, _ in done}
            if len(steps) != 1:  # a worker ran out of data early (exact mode): EpochStream says so in one line
                return
            self._skipped += sum(bad for _, bad, _ in done)
            self._retries += sum(retries for _, _, retries in done)
            batch = self.dataset.batch(steps.pop())
            yield batch.pin_memory() if self.pin else batch.clone()

    @property
    def skipped_samples(self) -> int:
        return self._skipped

    @property
    def shard_retries(self) -> int:
        """Reconnections to shard servers so far (http shards), summed over this rank's workers."""
        return self._retries

    def close(self) -> None:
        """Stop the worker processes now rather than whenever the garbage collector gets to them."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def partition_chunks(
    plan: StreamPlan, epoch: int, partition: int, skip: int, bad: BadSamples
) -> Iterator[list[np.ndarray]]:
    """A partition's chunks of an epoch (plan.chunk images each) after skipping `skip` of them; the
    samples it cannot decode are counted in `bad`."""
    items = decoded_samples(shard_passes(_shard_stream(plan, epoch, partition), plan.retry, bad.retried), plan, bad)
    shuffled = wds.shuffle(
        plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=random.Random(mix(plan.seed, epoch, partition, 2))
    )(items)
    for _ in range(skip * plan.chunk):
        if next(shuffled, None) is None:
            return
    chunk: list[np.ndarray] = []
    for item in shuffled:
        if isinstance(item, tuple):  # (encoded bytes, shard url): decoded after the shuffle
            try:
                item = decode_image(item[0], plan.channels, plan.resolution)
            except CorruptSample as exc:
                bad.skip(str(exc), item[1])
                continue
            bad.good()
        chunk.append(item)
        if len(chunk) == plan.chunk:
            yield chunk
            chunk = []
