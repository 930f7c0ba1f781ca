"""The DCGAN generator and discriminator of Radford et al. (2015), for any power-of-two resolution.

At 64x64 with nz=100, ngf=ndf=64 and 3 channels the layers (and parameter counts: G 3,576,704,
D 2,765,568) are exactly those of pytorch/examples' dcgan. Each extra doubling of the resolution adds
one strided (de)convolution block and doubles the widest layer, as the paper's recipe does.
D returns logits: the losses apply the sigmoid (BCE-with-logits), which is safe under autocast.

`model.spectral_norm` (off by default) puts torch's spectral-norm parametrization on D's conv layers, or on
G's and D's: each weight is divided by an estimate of its largest singular value, refined by one power
iteration per forward in train mode; the estimate's vectors are buffers (`..._u`, `..._v`) that
checkpoints keep. It is applied after the paper's init of each network, which therefore draws the same weights
as without it (D's under `both` excepted: G's vectors are drawn first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dcgan.config import ModelConfig


def num_upsamplings(resolution: int) -> int:
    """Strided blocks between the 4x4 core and the image (3 at 32x32, 4 at 64x64, 5 at 128x128)."""
    return int(math.log2(resolution)) - 2


def init_weights(module: nn.Module) -> None:
    """The paper's init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02) and bias 0 (as are the
    biases of D's convs under model.d_norm=none, where no BatchNorm follows them)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (N, nz) -> image (N, C, R, R) in [-1, 1]: transposed convs, BatchNorm, ReLU, tanh output."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.nz = config.nz
        blocks = num_upsamplings(config.resolution)
        width = config.ngf * 2 ** (blocks - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(config.nz, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(blocks - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, config.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)
        if config.spectral_norm == "both":
            normalize_convs(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (N, C, R, R) -> logits (N,): strided convs, BatchNorm (not on the input layer; none with
    model.d_norm=none, the inner convs then with biases), LeakyReLU 0.2."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        blocks = num_upsamplings(config.resolution)
        width = config.ndf
        layers: list[nn.Module] = [
            nn.Conv2d(config.channels, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        batchnorm = config.d_norm == "batch"
        for _ in range(blocks - 1):
            layers.append(nn.Conv2d(width, width * 2, 4, 2, 1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width * 2))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)
        if config.spectral_norm in ("d", "both"):
            normalize_convs(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).view(-1)


def normalize_convs(module: nn.Module) -> None:
    """Spectral normalization on every (transposed) conv layer of `module`, in place. Each layer draws its
    two starting vectors from torch's global generator (the models are built under the run's seed, so
    every rank draws the same). With `both`, G's draws come before D is built, so D's initial weights are
    not those of the same seed without spectral normalization. (Putting the generator's state back here
    made tests/integration/test_resize.py's 2 -> 1 -> 4 rank run diverge, for a reason not found yet.)"""
    for layer in list(module.modules()):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            spectral_norm(layer)


def spectral_norm_vectors(module: nn.Module) -> list[torch.Tensor]:
    """The power iteration's vectors (u, v of each normalized layer), in module order; [] without
    spectral normalization."""
    return [buffer for name, buffer in module.named_buffers() if name.endswith(("._u", "._v"))]


@contextmanager
def _kept(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Put `tensors` back to their values at entry when the block ends (however it ends)."""
    kept = [(tensor, tensor.clone()) for tensor in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in kept:
                tensor.copy_(value)


def spectral_norm_vectors_kept(module: nn.Module) -> AbstractContextManager[None]:
    """Forwards in train mode that are not training (BatchNorm statistics re-estimated, images with batch
    statistics) leave the power iteration's vectors as they were, so that making images never changes
    what training or a resumed run computes next."""
    return _kept(spectral_norm_vectors(module))


def buffers_kept(module: nn.Module) -> AbstractContextManager[None]:
    """Train-mode forwards that only measure (D_overfit's scores of held-out reals) leave every buffer as
    it was: BatchNorm's running statistics and counts, and the power iteration's vectors."""
    return _kept(list(module.buffers()))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
