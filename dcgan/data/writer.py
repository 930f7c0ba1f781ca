"""`dcgan shards`: convert a data set once into WebDataset tar shards plus a manifest.

Images are written in a seeded random order by default: an image folder lists its classes (or its
sources) one after another, and the loader reads blocks in stored order through a bounded shuffle
window, so a folder written as listed would give each window, and so each batch, a few classes at a
time. Permuted once here, every block, shard and window is a random sample of the data set.

Shards are written in parallel by worker processes, each under a temporary name that is renamed only
when the shard is complete; the manifest is written last. A directory with a manifest is therefore
always a complete, consistent data set, and an interrupted conversion leaves no file a loader would use.

`holdout` keeps the last images of the written order (a random sample, as every block is) out of the
training shards, in a shard set of their own under OUT_DIR/holdout: reals D never trains on, against
which `data.holdout` measures D's overfitting (dcgan.train.overfit).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from dcgan.console import bar
from dcgan.data.formats import CHECKSUM, MANIFEST, Manifest, ShardInfo, checksum, encode_block, encode_image
from dcgan.data.inputs import find_mnist, list_images, load_image_file, read_idx, resize_array
from dcgan.files import atomic_path

KINDS = ("folder", "mnist", "digits")
HOLDOUT_DIR = "holdout"
"""Where `write_shards(..., holdout=N)` puts the held-out images: a shard set of its own inside OUT_DIR."""


@dataclass(frozen=True)
class ShardLayout:
    """How a data set is written: the settings its training shards, its held-out shards and every shard
    task share (and its manifest records)."""

    fmt: str = "blocks"
    resolution: int = 64
    channels: int = 3
    """Requested channels of a folder's images; MNIST and the digits are always written with 1."""
    crop: int = 0
    shard_size: int = 10000
    block_size: int = 256
    permutation_seed: int | None = 0
    """Seed of the written order's permutation; None keeps the source's order."""


@dataclass
class ShardTask:
    """One shard's worth of work; `files` (folder) or `images`/`labels` (arrays) is set."""

    index: int
    first_key: int
    out_dir: Path
    layout: ShardLayout
    channels: int
    """The channels written (1 for MNIST and the digits, whatever the layout asks)."""
    files: list[Path] | None = None
    images: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"


def _load_task_images(task: ShardTask) -> tuple[list[np.ndarray], list[int], int]:
    """Preprocessed uint8 (C, R, R) images and labels of a task; unreadable files are skipped."""
    if task.files is None:
        assert task.images is not None and task.labels is not None
        resolution, labels = task.layout.resolution, [int(x) for x in task.labels]
        if task.images.shape[-1] == resolution and task.images.ndim == 4:
            return list(task.images), labels, 0
        return [resize_array(im, resolution, task.layout.crop) for im in task.images], labels, 0
    images, skipped = [], 0
    for path in task.files:
        try:
            images.append(load_image_file(path, task.layout.resolution, task.channels, task.layout.crop))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for damaged files
            skipped += 1
            print(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return images, [-1] * len(images), skipped


def write_shard(task: ShardTask) -> tuple[int, int, int]:
    """Write one shard (temp name, then rename); return (index, samples written, inputs skipped)."""
    images, labels, skipped = _load_task_images(task)
    final, fmt, block_size = task.out_dir / task.name, task.layout.fmt, task.layout.block_size
    with atomic_path(final) as tmp, wds.TarWriter(str(tmp)) as sink:
        if fmt == "blocks":
            for start in range(0, len(images), block_size):
                block = np.stack(images[start : start + block_size])
                members = encode_block(block, np.asarray(labels[start : start + block_size]))
                sink.write({"__key__": f"{task.first_key + start:09d}", **members})
        else:
            for offset, (image, label) in enumerate(zip(images, labels, strict=True)):
                ext, data = encode_image(image, fmt)
                sink.write(
                    {
                        "__key__": f"{task.first_key + offset:09d}",
                        ext: data,
                        "cls": str(label).encode(),
                        CHECKSUM: checksum(data),
                    }
                )
    return task.index, len(images), skipped


def written_order(count: int, permutation_seed: int | None) -> np.ndarray:
    """The source's image indices in the order they are written: a permutation seeded by
    `permutation_seed`, or the source's own order (None)."""
    if permutation_seed is None:
        return np.arange(count)
    return np.random.default_rng(permutation_seed).permutation(count)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def plan_tasks(
    kind: str,
    source: Path,
    out_dir: Path,
    layout: ShardLayout,
    part: slice = slice(None),
) -> tuple[list[ShardTask], int]:
    """Split the input, in the order written (`written_order`), into shard tasks; returns (tasks,
    channels actually written). `part` selects a slice of that order (the training images or the
    held-out ones)."""
    common: dict[str, Any] = dict(out_dir=out_dir, layout=layout)
    if kind == "folder":
        files = list_images(source)
        if not files:
            raise FileNotFoundError(f"no image files under {source}")
        files = [files[i] for i in written_order(len(files), layout.permutation_seed)][part]
        return [
            ShardTask(index=i, first_key=a, channels=layout.channels, files=files[a:b], **common)
            for i, (a, b) in enumerate(_chunks(len(files), layout.shard_size))
        ], layout.channels
    if kind == "mnist":
        image_path, label_path = find_mnist(source)
        images, labels = read_idx(image_path), read_idx(label_path)
        if len(images) != len(labels):
            raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    elif kind == "digits":
        from dcgan.data.digits import digits_images, load_digits_arrays

        images, labels = digits_images(layout.resolution).numpy(), load_digits_arrays()[1]
    else:
        raise ValueError(f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    order = written_order(len(images), layout.permutation_seed)[part]
    images, labels = images[order], labels[order]
    return [
        ShardTask(index=i, first_key=a, channels=1, images=images[a:b], labels=labels[a:b], **common)
        for i, (a, b) in enumerate(_chunks(len(images), layout.shard_size))
    ], 1


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT_DIR unless overwriting, in which case old shards and manifest go first, with
    any temporary one a killed writer left (dcgan.files: `.shard-....tmp`)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace its shards")
        for path in out_dir.iterdir():
            if path.name.lstrip(".").startswith((MANIFEST, "shard-")):
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_shards(
    kind: str,
    source: Path,
    out_dir: Path,
    *,
    fmt: str = "blocks",
    resolution: int = 64,
    channels: int = 3,
    crop: int = 0,
    shard_size: int = 10000,
    block_size: int = 256,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    permutation_seed: int | None = 0,
    holdout: int = 0,
) -> Manifest:
    """Convert `source` into shards under `out_dir`, its images in a permutation seeded by
    `permutation_seed` (None: the source's order), and return the manifest written there; the last
    `holdout` images of that order go to out_dir/holdout instead (HOLDOUT_DIR), a shard set of their own."""
    if holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {holdout}")
    layout = ShardLayout(fmt, resolution, channels, crop, shard_size, block_size, permutation_seed)
    settings: dict[str, Any] = dict(layout=layout, workers=workers, overwrite=overwrite, progress=progress)
    manifest = _write_part(kind, source, out_dir, slice(0, -holdout if holdout else None), **settings)
    held_out_dir = out_dir / HOLDOUT_DIR
    if holdout:
        held_out = _write_part(kind, source, held_out_dir, slice(-holdout, None), **settings)
        if held_out.total_samples < holdout:
            raise ValueError(
                f"--holdout {holdout}: the source has only {held_out.total_samples} readable images to hold out"
            )
    elif overwrite and held_out_dir.is_dir():
        shutil.rmtree(held_out_dir)  # the held-out images of the shards replaced: now in the training set
    return manifest


def _write_part(
    kind: str,
    source: Path,
    out_dir: Path,
    part: slice,
    *,
    layout: ShardLayout,
    workers: int,
    overwrite: bool,
    progress: bool,
) -> Manifest:
    """write_shards for one slice of the written order, into its own directory and manifest."""
    prepare_out_dir(out_dir, overwrite)
    tasks, channels = plan_tasks(kind, source, out_dir, layout, part)
    if not tasks:
        raise ValueError(f"{out_dir}: no images left to write (is --holdout larger than the data set?)")
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    counts: dict[int, int] = {}
    skipped = 0
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _InlinePool() as pool:
        for index, samples, bad in pool.imap_unordered(write_shard, tasks):
            counts[index] = samples
            skipped += bad
            if progress:
                _show_progress(len(counts), len(tasks), sum(counts.values()), time.perf_counter() - started)
    if progress:
        print(file=sys.stderr)
    manifest = Manifest(
        format=layout.fmt,
        resolution=layout.resolution,
        channels=channels,
        source=str(source),
        kind=kind,
        block_size=layout.block_size if layout.fmt == "blocks" else 0,
        shards=[ShardInfo(t.name, counts[t.index]) for t in tasks],
        skipped_inputs=skipped,
        permutation_seed=layout.permutation_seed,
    )
    manifest.write(out_dir)
    return manifest


def _show_progress(done: int, total: int, images: int, elapsed: float) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    print(
        f"{bar(done, total)} {done}/{total} shards, {images} images, {images / max(elapsed, 1e-9):.0f} img/s",
        end=end,
        file=sys.stderr,
        flush=True,
    )


class _InlinePool:
    """The Pool interface, run in this process (one worker: no process start-up cost)."""

    def __enter__(self) -> _InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def imap_unordered(fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
        return map(fn, items)
