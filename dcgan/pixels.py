"""Images as files and data sets hold them (uint8, 0..255) and as G and D see them (floats in [-1, 1], G's
tanh range): the two conversions, in one place, so that every reader and writer of images agrees to the bit
(the training step, the reference step, evaluation, the probe and the digits score)."""

from __future__ import annotations

import torch


def from_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1] in `dtype`; on the images' device, so that the host only moves bytes."""
    return images.to(dtype=torch.float32, copy=True).mul_(1 / 127.5).sub_(1.0).to(dtype)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] on the CPU, rounded to the nearest level, as image files hold them."""
    return images.float().cpu().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
