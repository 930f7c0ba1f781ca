"""Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020), for small data sets.

D sees every real and every fake batch augmented the same way (colour, translation, cutout), so it
cannot overfit the few real images by memorising them, while G still learns the un-augmented
distribution: the augmentations are differentiable, so G's gradient passes through them. On the 1,797
built-in digits this is the regime where D overfits (docs/quality.md).

The random parameters of a step are a function of (seed, step) alone, drawn for the whole global batch,
of which each rank takes the slice at its own positions (the data stream gives rank r the global batch's
positions r x share .. (r + 1) x share): a run on any number of ranks, or resumed at any step, augments
each image the same way. The parameters are one tensor of uniforms per step, drawn outside the step's
body, so that a CUDA graph can replay the body with new parameters copied into a static buffer.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from dcgan.seeds import StepDraws

Pass = Literal["real", "fake_for_d", "fake_for_g"]
PASSES: tuple[Pass, ...] = get_args(Pass)
"""The batches D sees in one step, each augmented with its own draw: the real and the fake batch of D's
update, and the fake batch of G's update."""

UNIFORMS = 7
"""Uniforms per image and pass: brightness, saturation, contrast, shift (y, x), cutout centre (y, x)."""

TRANSLATION_RATIO = 0.125
"""The largest shift, as a fraction of the image side (DiffAugment's default)."""

CUTOUT_RATIO = 0.5
"""The cut square's side, as a fraction of the image side (DiffAugment's default)."""

AUGMENT_STREAM = 0xA06E
"""Tags the augmentation seeds apart from the noise's and the data order's, which mix the same run seed."""


def _color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness +-0.5, saturation x[0, 2), contrast x[0.5, 1.5), per image (images in [-1, 1])."""
    brightness, saturation, contrast = (u[:, i].view(-1, 1, 1, 1).to(x.dtype) for i in range(3))
    x = x + (brightness - 0.5)
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * (saturation * 2) + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (contrast + 0.5) + mean


def shifts(u: torch.Tensor, side: int) -> torch.Tensor:
    """Whole-pixel shifts in [-s, s] (s = TRANSLATION_RATIO x side, rounded) from uniforms in [0, 1)."""
    largest = int(side * TRANSLATION_RATIO + 0.5)
    return (u * (2 * largest + 1)).floor().long().clamp(max=2 * largest) - largest


def _translation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each image moved by whole pixels (y, x), zero (mid-grey) where it moved away from: two gathers with
    fixed shapes, no host read, differentiable."""
    n, c, h, w = x.shape
    dy, dx = shifts(u[:, 3], h), shifts(u[:, 4], w)
    rows = torch.arange(h, device=x.device).view(1, h) - dy.view(n, 1)
    cols = torch.arange(w, device=x.device).view(1, w) - dx.view(n, 1)
    keep = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    x = x.gather(2, rows.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w))
    x = x.gather(3, cols.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w))
    return x * keep.to(x.dtype)


def _cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A square of side CUTOUT_RATIO x side set to zero, centred anywhere in the image (clipped at its edges)."""
    n, _, h, w = x.shape
    size = int(h * CUTOUT_RATIO + 0.5)
    top = (u[:, 5] * h).floor().long().view(n, 1) - size // 2
    left = (u[:, 6] * w).floor().long().view(n, 1) - size // 2
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    inside_rows = ((rows >= top) & (rows < top + size)).view(n, 1, h, 1)
    inside_cols = ((cols >= left) & (cols < left + size)).view(n, 1, 1, w)
    return x * (~(inside_rows & inside_cols)).to(x.dtype)


OPERATIONS = {"color": _color, "translation": _translation, "cutout": _cutout}


def augment(x: torch.Tensor, u: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """x (N, C, H, W) augmented by `policy` with the per-image uniforms u (N, UNIFORMS). u stays fp32 (bf16
    would bin the shifts and cutout centres unevenly); only the colour factors take x's dtype."""
    for name in policy:
        x = OPERATIONS[name](x, u)
    return x


def augment_draws(
    seed: int, global_batch: int, rank: int, world_size: int, device: torch.device, at: int = 0
) -> StepDraws:
    """The uniforms of each step's passes, (len(PASSES), batch per rank, UNIFORMS), the same for any number
    of ranks and at resume (dcgan.seeds.StepDraws, as the latent noise)."""
    return StepDraws(
        seed, AUGMENT_STREAM, (len(PASSES), global_batch, UNIFORMS), 1, False, rank, world_size, device, at
    )
