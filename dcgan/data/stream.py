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
import io
import itertools
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan.config import Config, ConfigError, divisors
from dcgan.data.base import EpochStream, check_batch_fits
from dcgan.data.formats import MANIFEST, CorruptSample, Manifest, decode_block, decode_image, verify_checksum
from dcgan.data.remote import DEFAULT_RETRY, RetryPolicy, http_shard_urls, is_http, shard_name, shard_samples, uncounted
from dcgan.distributed import DistInfo
from dcgan.errors import ShardError
from dcgan.seeds import mix

log = logging.getLogger(__name__)

READ_BUFFER = 1 << 20
"""webdataset opens local shards with open(path, buffering=$GOPEN_BUFFER), read when each shard is opened;
with the default 8 KiB buffer, tarfile's 10 KiB stream reads turn every 3 MB block into hundreds of system
calls. 1 MiB raised the raw tar rate from ~50k to ~90k img/s (64x64 RGB blocks, docs/performance.md)."""

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


@dataclass(frozen=True)
class ShardSet:
    """Resolved `data.shards`: the shard URLs, their sample counts (if known), and the image format."""

    urls: list[str]
    counts: list[int] | None
    manifest: Manifest | None

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def resolve_shards(spec: str, timeout_s: float = RetryPolicy.timeout_s) -> ShardSet:
    """A directory with manifest.json, a brace pattern of local files, pipe: URLs, or http(s) URLs: a
    directory URL with manifest.json, or a pattern (dcgan.data.remote; timeout_s bounds the wait for
    the server's manifest)."""
    path = Path(spec)
    manifest: Manifest | None
    if is_http(spec):
        urls, manifest = http_shard_urls(spec, timeout_s)
        by_name = {s.name: s.samples for s in manifest.shards} if manifest is not None else {}
        names = [shard_name(u) for u in urls]
        counts = [by_name[n] for n in names] if by_name and all(n in by_name for n in names) else None
    elif path.is_dir():
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ConfigError(f"data.shards: {path} has no {MANIFEST} (write shards with `dcgan shards`)")
        manifest = Manifest.read(manifest_path)
        assert manifest is not None
        urls = [str(path / s.name) for s in manifest.shards]
        counts = [s.samples for s in manifest.shards]
    else:
        urls = list(wds.shardlists.expand_urls(spec))  # braces, '::' lists, $WDS_ variables
        manifest_path = Path(urls[0]).parent / MANIFEST
        manifest = (
            Manifest.read(manifest_path)
            if "://" not in spec and not spec.startswith("pipe:") and manifest_path.is_file()
            else None
        )
        counts = None
        if manifest is not None:
            by_name = {s.name: s.samples for s in manifest.shards}
            counts = [by_name[Path(u).name] for u in urls] if all(Path(u).name in by_name for u in urls) else None
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise ShardError(f"shard not found: {url}")
    if not urls:
        raise ConfigError(f"data.shards: no shards match {spec!r}")
    return ShardSet(urls, counts, manifest)


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


def _raise_naming_shard(exc: Exception) -> bool:
    """webdataset handler for tar-level errors: stop with the shard's name (never sleep, never skip).
    webdataset passes an error to the handler once per pipeline stage it crosses, so a ShardError
    already raised here comes back and is re-raised as it is."""
    if isinstance(exc, ShardError):
        raise exc
    text = " ".join(str(a) for a in exc.args)
    match = re.search(r"name='([^']+)'", text) or re.search(r"(\S+\.tar)\b", text)
    where = match.group(1) if match else "?"
    reason = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
    raise ShardError(
        f"cannot read shard {where}: {type(exc).__name__}: {reason} (truncated or damaged: write it again with `dcgan shards`)"
    ) from exc


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


def _shard_passes(
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
            yield from shard_samples(shard["url"], retry, on_retry, _raise_naming_shard)
        else:
            yield from wds.tarfile_to_samples(handler=_raise_naming_shard)(iter([shard]))
        yield {END_OF_SHARD: shard["url"]}


def _expand(samples: Iterator[dict[str, Any]], plan: StreamPlan, bad: BadSamples) -> Iterator[Any]:
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


def partition_chunks(
    plan: StreamPlan, epoch: int, partition: int, skip: int, bad: BadSamples
) -> Iterator[list[np.ndarray]]:
    """A partition's chunks of an epoch (plan.chunk images each) after skipping `skip` of them; the
    samples it cannot decode are counted in `bad`."""
    items = _expand(_shard_passes(_shard_stream(plan, epoch, partition), plan.retry, bad.retried), plan, bad)
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


def check_shape(shards: ShardSet, config: Config) -> None:
    """The shards' resolution and channels must be the model's (checked before any training)."""
    m = shards.manifest
    if m is None:
        return
    if m.resolution != config.model.resolution:
        raise ConfigError(
            f"model.resolution: the shards hold {m.resolution}x{m.resolution} images, config says {config.model.resolution}"
        )
    if m.channels != config.model.channels:
        raise ConfigError(
            f"model.channels: the shards hold {m.channels}-channel images, config says {config.model.channels}"
        )


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


def read_images(spec: str, resolution: int, channels: int, positions: set[int] | None = None) -> dict[int, np.ndarray]:
    """Images of a shard set by their position among its readable images in stored order (no shuffle,
    no workers): all of them, or those at `positions` (only those are decoded). Evaluation picks its
    reference set from these (dcgan.evaluate.reference_images)."""
    shards = resolve_shards(spec)
    plan = StreamPlan(
        urls=shards.urls,
        counts=shards.counts,
        seed=0,
        partitions=1,
        mine=(0,),
        workers=1,
        chunk=1,
        steps_per_epoch=0,
        shuffle_buffer=1,
        resampled=False,
        channels=channels,
        resolution=resolution,
    )
    bad = BadSamples()
    images: dict[int, np.ndarray] = {}
    last = max(positions) if positions else None
    position = -1
    for item in _expand(_shard_passes({"url": u} for u in shards.urls), plan, bad):
        position += 1
        if last is not None and position > last:
            break
        if positions is not None and position not in positions:
            continue
        try:
            images[position] = decode_image(item[0], channels, resolution) if isinstance(item, tuple) else item
        except CorruptSample as exc:
            bad.skip(str(exc), item[1])
        else:
            bad.good()
    return images


def read_labelled(spec: str, resolution: int, channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every readable image of a shard set with its class label (`cls`, or a block's `labels.npy`), in
    stored order: uint8 (N, C, R, R), int64 (N,), and how many unreadable samples were skipped."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped = 0
    for sample in _shard_passes({"url": u} for u in resolve_shards(spec).urls):
        if END_OF_SHARD in sample:
            continue
        try:
            if "images.npy" in sample:
                verify_checksum(sample, "images.npy")
                block = decode_block(sample["images.npy"], channels, resolution)
                block_labels = np.load(io.BytesIO(sample["labels.npy"]), allow_pickle=False)
                images.extend(block)
                labels.extend(int(label) for label in block_labels)
                continue
            ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if ext is None or "cls" not in sample:
                raise CorruptSample("no image or no cls member")
            verify_checksum(sample, ext)
            images.append(decode_image(sample[ext], channels, resolution))
            labels.append(int(sample["cls"]))
        except (CorruptSample, KeyError, ValueError):
            skipped += 1
    if not images:
        return np.empty((0, channels, resolution, resolution), np.uint8), np.empty(0, np.int64), skipped
    return np.stack(images), np.asarray(labels, dtype=np.int64), skipped
