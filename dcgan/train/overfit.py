"""Whether D is memorising its training images, measured as ADA does (Karras et al. 2020, its validation
heuristic r_v): how far D's output on reals it never sees (`data.holdout`, written by `dcgan shards
--holdout`) falls from its output on reals it trains on, towards its output on fakes.

    D_overfit = (E[D(train)] - E[D(held out)]) / (E[D(train)] - E[D(fake)])

0: D scores unseen reals as it scores its training images (it generalises); 1: it scores them as fakes
(it has memorised the training set, and pushes G towards copies of it): the sign that augmentation
(`loss.augment`) or a penalty (`loss.r1`) is needed. On D's raw outputs, so the same for every loss.kind.

D's BatchNorm normalizes each batch with its own statistics, so a batch of reals only is called real
whatever its images (accuracies measured that way were 100% on both sides while D memorised): training
and held-out reals are therefore scored in ONE batch, sharing its statistics, and only their images
differ; fakes in a batch of their own, as in training. The training images are the first batches this
process trains on after it starts (a resumed run measures other ones: a metric, not the trajectory), up
to MAX_BATCHES global batches on each side, each rank its slice, so that any number of ranks gives the
same figure. Buffers (running statistics, power iterations) are left as training left them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dcgan.config import Config, ConfigError
from dcgan.distributed.collectives import all_mean
from dcgan.distributed.env import DistInfo
from dcgan.distributed.parallelize import eager_forward
from dcgan.gan.models import buffers_kept
from dcgan.pixels import from_uint8
from dcgan.seeds import mix

MAX_BATCHES = 4
"""Global batches scored on each side per metric line, at most: 512 training and 512 held-out images at
the paper's batch of 128, for 4 D forwards of a double batch and one G and D forward every log.every steps."""
FAKES_STREAM = 0x0FF17
"""Tags the seed of the probe's fixed latents apart from the training noise's."""


class OverfitProbe:
    """D's raw outputs on training reals, held-out reals and fakes, and ADA's r_v from them (D_overfit)."""

    def __init__(self, held_out: list[torch.Tensor], latents: torch.Tensor) -> None:
        self.held_out = held_out
        self.latents = latents
        self.trained_on: list[torch.Tensor] = []

    @classmethod
    def for_run(cls, config: Config, info: DistInfo) -> OverfitProbe | None:
        """The probe of `data.holdout`, this rank's slices of its batches on the device; None without it."""
        if not config.data.holdout:
            return None
        from dcgan.data.offline import read_images

        global_batch = config.global_batch(info.world_size)
        m = config.model
        images = read_images(config.data.holdout, m.resolution, m.channels, set(range(MAX_BATCHES * global_batch)))
        batches = min(MAX_BATCHES, len(images) // global_batch)
        if batches == 0:
            raise ConfigError(
                f"data.holdout: {config.data.holdout} has {len(images)} readable images, fewer than one global "
                f"batch ({global_batch}); hold out more (dcgan shards --holdout)"
            )
        share = global_batch // info.world_size
        mine = slice(info.rank * share, (info.rank + 1) * share)
        stacked = torch.from_numpy(np.stack([images[i] for i in range(batches * global_batch)]))
        per_batch = stacked.view(batches, global_batch, *stacked.shape[1:])[:, mine]
        generator = torch.Generator().manual_seed(mix(config.seed, FAKES_STREAM))
        latents = torch.randn(global_batch, m.nz, generator=generator)[mine]
        return cls([batch.to(info.device) for batch in per_batch], latents.to(info.device))

    def remember(self, images: torch.Tensor) -> None:
        """Keep a copy of one of the first batches this process trains on (the loader may reuse its memory)."""
        if len(self.trained_on) < len(self.held_out):
            self.trained_on.append(images.clone())

    def measure(self, g: nn.Module, d: nn.Module, info: DistInfo) -> dict[str, float]:
        """D_out_train, D_out_heldout, D_out_fake (D's mean raw outputs) and D_overfit, over all ranks
        (every rank calls this together: cross-rank BatchNorm exchanges statistics in each forward)."""
        pairs = list(zip(self.trained_on, self.held_out, strict=False))
        with torch.no_grad(), buffers_kept(g), buffers_kept(d):
            outputs = [
                eager_forward(d, from_uint8(torch.cat([train, held]))).float().flatten() for train, held in pairs
            ]
            train = torch.cat([output[: len(output) // 2] for output in outputs]).mean()
            held_out = torch.cat([output[len(output) // 2 :] for output in outputs]).mean()
            fake = eager_forward(d, eager_forward(g, self.latents)).float().mean()
        train_out, held_out_out, fake_out = all_mean(torch.stack([train, held_out, fake]), info).tolist()
        separation = train_out - fake_out
        return {
            "D_out_train": train_out,
            "D_out_heldout": held_out_out,
            "D_out_fake": fake_out,
            "D_overfit": (train_out - held_out_out) / separation if separation > 0 else math.nan,
        }
