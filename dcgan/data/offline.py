"""Reading images from shards outside training, without the loader's partitions and workers: the
reference images of an evaluation and the labelled images of the linear probe.
"""

from __future__ import annotations

import io

import numpy as np

from dcgan.data.formats import CorruptSample, decode_block, decode_image, verify_checksum
from dcgan.data.partitions import StreamPlan
from dcgan.data.shards import resolve_shards
from dcgan.data.stream import END_OF_SHARD, IMAGE_EXTENSIONS, BadSamples, decoded_samples, shard_passes


def read_images(spec: str, resolution: int, channels: int, positions: set[int] | None = None) -> dict[int, np.ndarray]:
    """Images of a shard set by their position among its readable images in stored order (no shuffle,
    no workers): all of them, or those at `positions` (only those are decoded). Evaluation picks its
    reference set from these (dcgan.evaluation.evaluate.reference_images)."""
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
    for item in decoded_samples(shard_passes({"url": u} for u in shards.urls), plan, bad):
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
    for sample in shard_passes({"url": u} for u in resolve_shards(spec).urls):
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
