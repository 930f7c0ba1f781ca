"""The pytorch/examples DCGAN step, as that example trains (fp32, eager, BCE on Sigmoid outputs, one
optimizer step per network): the baseline that `dcgan bench step` times the project's step against and
that `dcgan compare --a recipe` trains. It is the recipe whatever the config's options beyond the paper
(`recipe_model`): no spectral normalization, BatchNorm in D, BCE, one lr and one pair of betas (optim.lr, beta1, beta2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dcgan.config import Config, ModelConfig
from dcgan.gan.models import Discriminator, Generator
from dcgan.pixels import from_uint8


def recipe_model(model: ModelConfig) -> ModelConfig:
    """The config's model as the recipe builds it: the paper's layers, without spectral normalization."""
    return dataclasses.replace(model, spectral_norm="none", d_norm="batch")


class ReferenceStep:
    """pytorch/examples/dcgan/main.py's iteration, with its model (our G and D, plus D's Sigmoid)."""

    def __init__(self, config: Config, device: torch.device) -> None:
        self.model = recipe_model(config.model)
        self.g = Generator(self.model).to(device)
        self.d = nn.Sequential(Discriminator(self.model), nn.Sigmoid()).to(device)
        betas = (config.optim.beta1, config.optim.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=config.optim.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=config.optim.lr, betas=betas)
        self.loss = nn.BCELoss()
        self.nz = config.model.nz

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        real = from_uint8(images)
        batch = real.shape[0]
        ones = torch.full((batch,), 1.0, device=real.device)
        zeros = torch.full((batch,), 0.0, device=real.device)
        self.d.zero_grad()
        err_real = self.loss(self.d(real), ones)
        err_real.backward()
        fake = self.g(torch.randn(batch, self.nz, device=real.device))
        err_fake = self.loss(self.d(fake.detach()), zeros)
        err_fake.backward()
        self.opt_d.step()
        self.g.zero_grad()
        err_g = self.loss(self.d(fake), ones)
        err_g.backward()
        self.opt_g.step()
        return err_real + err_fake
