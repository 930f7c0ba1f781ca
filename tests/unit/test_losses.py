"""The losses of loss.kind on hand-computed values, and D's outputs read on one scale (the metric line's
D_x and D_G_z)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dcgan.gan.losses import discriminator_loss, generator_loss, realness

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-3.0, 0.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_is_the_papers_loss_and_the_default_bit_for_bit() -> None:
    expected_d = sum(softplus(-x) for x in REAL.tolist()) / 3 + sum(softplus(x) for x in FAKE.tolist()) / 2
    assert discriminator_loss(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    assert generator_loss(FAKE).item() == pytest.approx(sum(softplus(-x) for x in FAKE.tolist()) / 2, rel=1e-6)
    # what the step computed before loss.kind existed, exactly
    before = F.binary_cross_entropy_with_logits(REAL, torch.ones(3)) + F.binary_cross_entropy_with_logits(
        FAKE, torch.zeros(2)
    )
    assert torch.equal(discriminator_loss(REAL, FAKE, "bce"), before)
    assert torch.equal(generator_loss(FAKE, "bce"), F.binary_cross_entropy_with_logits(FAKE, torch.ones(2)))


def test_hinge_losses() -> None:
    # relu(1 - real): 0, 0.5, 2 -> mean 5/6; relu(1 + fake): 0, 1 -> mean 1/2
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(5 / 6 + 1 / 2)
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(1.5)  # -mean(-3, 0)


def test_least_squares_losses() -> None:
    # (real - 1)^2 / 2: 0.5, 0.125, 2 -> mean 0.875; fake^2 / 2: 4.5, 0 -> mean 2.25
    assert discriminator_loss(REAL, FAKE, "lsgan").item() == pytest.approx(0.875 + 2.25)
    assert generator_loss(FAKE, "lsgan").item() == pytest.approx((8 + 0.5) / 2)  # (fake - 1)^2 / 2: 8, 0.5


@pytest.mark.parametrize("kind", ["bce", "hinge", "lsgan"])
def test_every_loss_is_fp32_from_half_precision_outputs_and_pulls_the_right_way(kind: str) -> None:
    # outputs between least squares' targets (0 fake, 1 real), where every loss pulls the same way
    real = torch.tensor([0.5, -1.0, 0.25], dtype=torch.bfloat16, requires_grad=True)
    fake = torch.tensor([0.75, 0.0], dtype=torch.bfloat16, requires_grad=True)
    loss_d = discriminator_loss(real, fake, kind)  # type: ignore[arg-type]
    assert loss_d.dtype == torch.float32
    loss_d.backward()
    assert (real.grad <= 0).all() and (fake.grad >= 0).all()  # D raises real outputs, lowers fake ones
    fake_g = torch.tensor([0.75, -3.0], requires_grad=True)
    generator_loss(fake_g, kind).backward()  # type: ignore[arg-type]
    assert (fake_g.grad <= 0).all() and (fake_g.grad < 0).any()  # G raises D's output on its images


def test_realness_reads_every_kind_on_the_probability_scale() -> None:
    assert torch.equal(realness(REAL, "bce"), torch.sigmoid(REAL))
    assert realness(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]), "hinge").tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert torch.equal(realness(REAL, "lsgan"), REAL)  # fitted to 1 (real) and 0 (fake) already
