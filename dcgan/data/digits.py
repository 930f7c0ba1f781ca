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
    """Each epoch: a seeded permutation of all digits, rank r taking every world-th one, full batches only."""

    def __init__(self, resolution: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.images = digits_images(resolution)
        per_rank = len(self.images) // world_size
        holds = (
            f"the built-in digits hold {per_rank}"
            if world_size == 1
            else (f"each of {world_size} ranks holds {per_rank} of the {len(self.images)} built-in digits")
        )
        check_batch_fits(batch_size, per_rank, holds, "use a smaller train.batch_size, or shards of a larger data set")
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        super().__init__(self._epoch, per_rank // batch_size)

    def _epoch(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        mine = order[self.rank :: self.world_size]
        for b in range(skip, self.batches_per_epoch):
            yield self.images[mine[b * self.batch_size : (b + 1) * self.batch_size]]

    @property
    def skipped_samples(self) -> int:
        return 0
