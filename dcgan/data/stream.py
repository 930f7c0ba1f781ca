"""Streaming WebDataset shards to many ranks, each rank its own shards, resumable to the exact batch.

Per rank, DataLoader workers each produce a "lane" of batches: in an epoch, lane l produces the batches
at positions l, l+W, l+2W, ... (W = workers), from a sample stream seeded by (seed, rank, epoch, lane):
- resampled mode (default): shards drawn with replacement, so every rank has an endless stream and all
  ranks yield the same number of full batches (uneven counts would hang DDP and cross-rank BatchNorm);
- exact mode (data.resampled=false): each epoch the shard list is shuffled (same order on all ranks) and
  dealt to ranks, then to lanes; every sample is seen at most once per epoch.
Samples pass through a shuffle buffer before they are decoded and batched. The DataLoader hands out
batches round-robin over workers, so lane l is simply worker l; after a resume in the middle of an epoch
the lanes are rotated so that the worker asked first produces the next position. The stream after a
resume is therefore exactly the stream an uninterrupted run would have seen (for data without corrupt
samples: a skipped sample shifts the batches that follow it).

Images stay uint8 on the host (pinned when training on CUDA) and are normalized on the device.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan.config import Config, ConfigError
from dcgan.data.base import EpochStream, check_batch_fits
from dcgan.data.formats import MANIFEST, CorruptSample, Manifest, decode_block, decode_image, verify_checksum
from dcgan.distributed import DistInfo
from dcgan.errors import ShardError

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


def resolve_shards(spec: str) -> ShardSet:
    """A directory with manifest.json, a brace pattern of local files, or pipe:/http(s) URLs."""
    path = Path(spec)
    if path.is_dir():
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ConfigError(f"data.shards: {path} has no {MANIFEST} (write shards with `dcgan shards`)")
        manifest: Manifest | None = Manifest.read(manifest_path)
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
    """Everything a worker needs to produce its lane of an epoch (picklable, no open handles)."""

    urls: list[str]
    counts: list[int] | None
    seed: int
    rank: int
    world_size: int
    workers: int
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int
    resampled: bool
    channels: int
    resolution: int

    def lane_positions(self, lane: int, start: int) -> int:
        """How many of positions start.. in an epoch belong to lane `lane` (every W-th from lane)."""
        first = lane if lane >= start else lane + -(-(start - lane) // self.workers) * self.workers
        return max(0, -(-(self.batches_per_epoch - first) // self.workers))

    def exact_shards(self, epoch: int) -> list[list[list[int]]]:
        """Exact mode: shard indices per [rank][lane] for an epoch (same shuffle on every rank)."""
        order = list(range(len(self.urls)))
        random.Random(_mix(self.seed, epoch, 0x5EED)).shuffle(order)
        per_rank = [order[r :: self.world_size] for r in range(self.world_size)]
        return [[mine[lane :: self.workers] for lane in range(self.workers)] for mine in per_rank]


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash of ints is not salted)."""
    seed = 0x9E3779B97F4A7C15
    for value in values:
        seed = (seed * 1_000_003 + value + 0x632BE5AB) & 0x7FFF_FFFF_FFFF_FFFF
    return seed


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


class LaneDataset(IterableDataset):
    """One worker's lane of one epoch. The main process sets (epoch, start, rotation) in shared memory
    before each epoch; persistent workers read it when their iterator is re-created."""

    def __init__(self, plan: StreamPlan) -> None:
        super().__init__()
        self.plan = plan
        self.control = torch.zeros(3, dtype=torch.int64).share_memory_()  # epoch, start position, rotation

    def set_epoch(self, epoch: int, start: int) -> None:
        self.control[0], self.control[1], self.control[2] = epoch, start, start % max(self.plan.workers, 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start, rotation = (int(v) for v in self.control)
        lane = (worker + rotation) % self.plan.workers
        count = self.plan.lane_positions(lane, start)
        skip = self.plan.lane_positions(lane, 0) - count
        yield from lane_batches(self.plan, epoch, lane, skip, count)


def _shard_stream(plan: StreamPlan, epoch: int, lane: int) -> Iterator[dict[str, str]]:
    if plan.resampled:
        rng = random.Random(_mix(plan.seed, epoch, plan.rank, lane, 1))
        while True:
            yield {"url": rng.choice(plan.urls)}
    else:
        for index in plan.exact_shards(epoch)[plan.rank][lane]:
            yield {"url": plan.urls[index]}


CONSECUTIVE_BAD_LIMIT = 200
"""Undecodable samples (or blocks) in a row after which a lane stops the run: shards of another shape
or wholly damaged ones would otherwise be skipped forever without a step ever completing."""

WARNED_BAD_BLOCKS = 5
"""Corrupt blocks a lane names in the log; the rest are only counted (skipped_samples)."""


@dataclass
class BadSamples:
    """A lane's undecodable samples: counted for stats.jsonl, bounded when they come in a row."""

    since_batch: int = 0
    in_a_row: int = 0
    warned: int = 0

    def warn(self, message: str, *args: object) -> None:
        """Log the first WARNED_BAD_BLOCKS problems of a lane; the rest are only counted."""
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


def _shard_passes(shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Samples of each shard in turn, each pass followed by an END_OF_SHARD marker (the same shard may
    be drawn twice in a row, so a change of URL cannot mark the end of a pass). Set here, in the process
    that reads (a loader worker, or training itself): the read buffer, unless the user chose one."""
    os.environ.setdefault("GOPEN_BUFFER", str(READ_BUFFER))
    for shard in shards:
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


def lane_batches(plan: StreamPlan, epoch: int, lane: int, skip: int, count: int) -> Iterator[tuple[torch.Tensor, int]]:
    """`count` batches of this lane after skipping `skip`, each with the number of samples skipped as
    corrupt since the previous batch (so the main process can count them across worker processes)."""
    bad = BadSamples()
    items = _expand(_shard_passes(_shard_stream(plan, epoch, lane)), plan, bad)
    shuffled = wds.shuffle(
        plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=random.Random(_mix(plan.seed, epoch, plan.rank, lane, 2))
    )(items)
    for _ in range(skip * plan.batch_size):
        if next(shuffled, None) is None:
            return
    produced = 0
    batch: list[np.ndarray] = []
    for item in shuffled:
        if produced == count:
            return
        if isinstance(item, tuple):  # (encoded bytes, shard url): decoded after the shuffle
            try:
                item = decode_image(item[0], plan.channels, plan.resolution)
            except CorruptSample as exc:
                bad.skip(str(exc), item[1])
                continue
            bad.good()
        batch.append(item)
        if len(batch) == plan.batch_size:
            yield torch.from_numpy(np.stack(batch)), bad.since_batch
            bad.since_batch = 0
            batch = []
            produced += 1


class ShardSource(EpochStream):
    """The shard loader behind the training loop's BatchSource interface."""

    def __init__(self, config: Config, info: DistInfo, *, pin_memory: bool | None = None) -> None:
        shards = resolve_shards(config.data.shards)
        self.shards = shards
        check_shape(shards, config)
        d, batch = config.data, config.train.batch_size
        workers = max(d.workers, 1)
        if not d.resampled and len(shards.urls) < info.world_size * workers:
            raise ConfigError(
                f"data.shards: {len(shards.urls)} shards cannot feed {info.world_size} rank(s) x {workers} worker(s) "
                "in exact mode (data.resampled=false): write more, smaller shards (dcgan shards --shard-size), "
                "use fewer data.workers, or set data.resampled=true"
            )
        plan = StreamPlan(
            urls=shards.urls,
            counts=shards.counts,
            seed=config.seed,
            rank=info.rank,
            world_size=info.world_size,
            workers=workers,
            batch_size=batch,
            batches_per_epoch=0,
            shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled,
            channels=config.model.channels,
            resolution=config.model.resolution,
        )
        plan = dataclasses.replace(plan, batches_per_epoch=epoch_batches(plan, d.epoch_samples))
        self.plan = plan
        self.dataset = LaneDataset(plan)
        pin = info.device.type == "cuda" if pin_memory is None else pin_memory
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=d.workers,
            pin_memory=pin,
            persistent_workers=d.workers > 0,
            prefetch_factor=d.prefetch if d.workers > 0 else None,
            # forkserver: workers start from a clean process, not a fork of one that holds CUDA/NCCL
            # threads or other loaders (a forked child that garbage-collects an inherited loader
            # iterator shuts down the parent's workers).
            multiprocessing_context="forkserver" if d.workers > 0 else None,
        )
        self._skipped = 0
        super().__init__(self._epoch, plan.batches_per_epoch)

    def _epoch(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        self.dataset.set_epoch(epoch, start)
        for images, bad in self.loader:
            self._skipped += bad
            yield images

    @property
    def skipped_samples(self) -> int:
        return self._skipped

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


def epoch_batches(plan: StreamPlan, epoch_samples: int) -> int:
    """Batches per rank per epoch; identical on every rank, so DDP never waits on a missing batch."""
    if not plan.resampled:
        if plan.counts is None:
            raise ConfigError(
                "data.resampled=false needs per-shard sample counts: point data.shards at a directory with manifest.json"
            )
        shares = plan_exact_counts(plan)
        return plan.workers * min(shares)
    if epoch_samples:
        samples = epoch_samples
    elif plan.counts is not None:
        samples = sum(plan.counts) // plan.world_size
    else:
        raise ConfigError("data.epoch_samples: must be > 0 when the shards have no manifest (URLs or patterns)")
    holds = "data.epoch_samples gives" if epoch_samples else "the shards hold"
    check_batch_fits(plan.batch_size, samples, f"{holds} {samples} per rank per epoch")
    return samples // plan.batch_size


def plan_exact_counts(plan: StreamPlan) -> list[int]:
    """Exact mode: full batches each (rank, lane) can make; the smallest bounds every lane's share.

    The shard deal changes every epoch, so the bound is taken over the worst case: the lanes' shard
    counts are fixed, the shards themselves vary, so the smallest shards are assumed."""
    assert plan.counts is not None
    lanes = plan.world_size * plan.workers
    per_lane = len(plan.urls) // lanes
    smallest = sorted(plan.counts)[:per_lane]
    check_batch_fits(
        plan.batch_size, sum(smallest), f"one worker's share of the shards holds {sum(smallest)} (data.resampled=false)"
    )
    return [sum(smallest) // plan.batch_size]


def read_images(spec: str, resolution: int, channels: int, positions: set[int] | None = None) -> dict[int, np.ndarray]:
    """Images of a shard set by their position among its readable images in stored order (no shuffle,
    no workers): all of them, or those at `positions` (only those are decoded). Evaluation picks its
    reference set from these (dcgan.evaluate.reference_images)."""
    shards = resolve_shards(spec)
    plan = StreamPlan(
        urls=shards.urls,
        counts=shards.counts,
        seed=0,
        rank=0,
        world_size=1,
        workers=1,
        batch_size=1,
        batches_per_epoch=0,
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
