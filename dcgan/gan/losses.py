"""GAN losses on D's raw outputs (loss.kind): the paper's BCE (Goodfellow et al. 2014, with the
non-saturating G loss), the hinge loss (Lim & Ye 2017; Miyato et al. 2018) and least squares (LSGAN,
Mao et al. 2017).

D returns raw outputs: logits for BCE, scores for hinge and LSGAN. BCE-with-logits instead of Sigmoid +
BCELoss: numerically stable, and the only form CUDA autocast accepts (BCELoss is refused there but not
on CPU, so CPU tests would not catch it). Every loss is computed in fp32, each term averaged over its own
batch (real and fake are separate batches, as the paper's recipe).

`realness` reads D's outputs on one scale for every kind, the metric line's D_x and D_G_z: 1 = D is sure
the image is real, 0 = sure it is fake, 0.5 = undecided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcgan.config import LossKind


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: LossKind = "bce") -> torch.Tensor:
    """bce: -log D(x) - log(1 - D(G(z))); hinge: relu(1 - D(x)) + relu(1 + D(G(z))); lsgan:
    (D(x) - 1)^2 / 2 + D(G(z))^2 / 2; each term averaged over its own batch."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "lsgan":
        return 0.5 * (real - 1).square().mean() + 0.5 * fake.square().mean()
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )


def generator_loss(fake_logits: torch.Tensor, kind: LossKind = "bce") -> torch.Tensor:
    """bce: the non-saturating -log D(G(z)), which keeps gradients alive early in training; hinge:
    -D(G(z)); lsgan: (D(G(z)) - 1)^2 / 2; averaged over the batch."""
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "lsgan":
        return 0.5 * (fake - 1).square().mean()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def realness(logits: torch.Tensor, kind: LossKind = "bce") -> torch.Tensor:
    """D's outputs, each read as how sure D is that its image is real (1 real, 0 fake, 0.5 undecided):
    bce: the sigmoid of the logit, D's probability; lsgan: the output itself, fitted to targets 1 and 0
    (its optimum, p_data / (p_data + p_g), is BCE's optimal probability; it may leave [0, 1]); hinge:
    (score + 1) / 2 clipped to [0, 1], 1 at the real margin (score >= 1, no loss on a real) and 0 at the
    fake one (score <= -1, no loss on a fake)."""
    values = logits.float()
    if kind == "hinge":
        return ((values + 1) / 2).clamp(0, 1)
    if kind == "lsgan":
        return values
    return torch.sigmoid(values)
