"""What training optimizes and how: the GAN loss (`loss`) and Adam's settings (`optim`), shared by G and D
as in the paper, or each network's own (two time-scale update rule, Heusel et al. 2017). The options
beyond the paper are off by default: a config that does not name them trains the paper's recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dcgan.config.vocabulary import LossKind, augment_policy, require
from dcgan.config.vocabulary import key_field as _field


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _field(2e-4, "Adam learning rate of G and D (paper: 2e-4 at batch 128)")
    beta1: float = _field(0.5, "Adam beta1 (paper: 0.5)")
    beta2: float = _field(0.999, "Adam beta2")
    lr_g: float | None = _field(None, "G's own Adam learning rate (two time-scale update rule); null = optim.lr")
    lr_d: float | None = _field(None, "D's own Adam learning rate (e.g. 4e-4 with lr_g=1e-4); null = optim.lr")
    beta1_g: float | None = _field(None, "G's own Adam beta1; null = optim.beta1")
    beta1_d: float | None = _field(None, "D's own Adam beta1; null = optim.beta1")
    beta2_g: float | None = _field(None, "G's own Adam beta2; null = optim.beta2")
    beta2_d: float | None = _field(None, "D's own Adam beta2; null = optim.beta2")

    def check(self) -> None:
        require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", "a finite number > 0", self.lr)
        for key in ("lr_g", "lr_d"):
            lr = getattr(self, key)
            require(lr is None or (math.isfinite(lr) and lr > 0), f"optim.{key}", "null or a finite number > 0", lr)
        for key in ("beta1", "beta2"):
            beta = getattr(self, key)
            require(0 <= beta < 1, f"optim.{key}", "in [0, 1)", beta)
        for key in ("beta1_g", "beta1_d", "beta2_g", "beta2_d"):
            beta = getattr(self, key)
            require(beta is None or 0 <= beta < 1, f"optim.{key}", "null or in [0, 1)", beta)

    def adam(self, network: Literal["G", "D"]) -> tuple[float, tuple[float, float]]:
        """(lr, betas) of `network`'s Adam: its own values where set, else the shared optim.lr / beta1 / beta2."""
        own = network.lower()

        def pick(key: str) -> float:
            value = getattr(self, f"{key}_{own}")
            return float(getattr(self, key) if value is None else value)

        return pick("lr"), (pick("beta1"), pick("beta2"))

    @property
    def per_network_lr(self) -> bool:
        """Whether G and D have their own learning rates (optim.lr_g or optim.lr_d set)."""
        return self.lr_g is not None or self.lr_d is not None


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = _field(
        "bce",
        "bce = the paper's (D: binary cross-entropy; G: non-saturating -log D(G(z))); hinge = D: mean "
        "relu(1 - D(x)) + mean relu(1 + D(G(z))), G: -mean D(G(z)) (Lim & Ye 2017, Miyato et al. 2018); lsgan = "
        "least squares to targets 1 (real) and 0 (fake), G to 1 (Mao et al. 2017)",
    )

    augment: str = _field(
        "",
        "DiffAugment (Zhao et al. 2020) of every batch D sees, real and fake alike: a comma-separated subset of "
        "color,translation,cutout; empty = none (the paper). Helps where D overfits a small data set",
    )

    r1: float = _field(
        0.0,
        "R1 penalty weight gamma (Mescheder et al. 2018): D's loss gains gamma/2 x the mean squared norm of "
        "its gradient on real images, D pushed flat where the data is; 0 = off (the paper). Lazy: computed every "
        "loss.r1_every steps and scaled by it, as StyleGAN2 does",
    )
    r1_every: int = _field(16, "steps between R1 penalties (lazy regularization, StyleGAN2's 16); 1 = every step")

    def check(self) -> None:
        augment_policy(self.augment)
        require(math.isfinite(self.r1) and self.r1 >= 0, "loss.r1", "a finite number >= 0 (0 = off)", self.r1)
        require(self.r1_every >= 1, "loss.r1_every", ">= 1", self.r1_every)
