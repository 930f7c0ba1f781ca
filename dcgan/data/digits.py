"""The built-in data set: scikit-learn's 1,797 real handwritten digits (8x8, 17 grey levels).

It ships inside a pip package, so a run works with no download: the quickstart, the tests and any
machine without a data set use it. Images are resized once to the model's resolution and kept in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dcgan.data.base import EpochStream, check_batch_fits
from dcgan.errors import LaunchError


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float64 (1797, 8, 8) in [0, 16], labels (1797,)) from scikit-learn (the `demo` extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LaunchError(
            "the built-in digits need scikit-learn: pip install 'dcgan[demo]' (or set data.shards)"
        ) from None
    digits = load_digits()
    return digits.images, digits.target


def digits_images(resolution: int) -> torch.Tensor:
    """All digits as uint8 (1797, 1, R, R), bilinearly upsampled from 8x8 (white strokes on black)."""
    images, _ = load_digits_arrays()
    small = torch.from_numpy(images).float().unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(small, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return big.round().clamp(0, 255).to(torch.uint8)


class DigitsSource(EpochStream):
    """Each epoch: one seeded permutation of all digits, cut into global batches; rank r trains on the
    r-th slice of each. The images of a step are therefore the same whatever the number of ranks."""

    def __init__(self, resolution: int, global_batch: int, seed: int, rank: int, world_size: int) -> None:
        self.images = digits_images(resolution)
        check_batch_fits(
            global_batch,
            len(self.images),
            f"the built-in digits ({len(self.images)})",
            "use a smaller train.global_batch or train.batch_size, or shards of a larger data set",
        )
        self.seed, self.global_batch = seed, global_batch
        self.share = global_batch // world_size
        self.first = rank * self.share
        super().__init__(self._epoch, len(self.images) // global_batch)

    def _epoch(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        for step in range(skip, self.batches_per_epoch):
            start = step * self.global_batch + self.first
            yield self.images[order[start : start + self.share]]

    @property
    def skipped_samples(self) -> int:
        return 0

    @property
    def shard_retries(self) -> int:
        return 0
