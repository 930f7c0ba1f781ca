"""DiffAugment's operations on known images and uniforms, and its draws' independence of the world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcgan.config import ConfigError
from dcgan.config.vocabulary import augment_policy
from dcgan.gan.augment import PASSES, UNIFORMS, augment, augment_draws, shifts

NEUTRAL = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
"""Uniforms that leave colour and position unchanged (cutout has no neutral draw)."""


def images(n: int = 4, side: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def uniforms(n: int, **columns: float) -> torch.Tensor:
    u = NEUTRAL.repeat(n, 1)
    for index, name in enumerate(("brightness", "saturation", "contrast", "dy", "dx", "cy", "cx")):
        if name in columns:
            u[:, index] = columns[name]
    return u


def test_neutral_uniforms_leave_colour_and_position_unchanged() -> None:
    x = images()
    assert torch.allclose(augment(x, uniforms(4), ("color", "translation")), x, atol=1e-6)


def test_brightness_moves_every_pixel_by_its_uniform_minus_a_half() -> None:
    x = images()
    out = augment(x, uniforms(4, brightness=0.9), ("color",))
    assert torch.allclose(out - x, torch.full_like(x, 0.4), atol=1e-6)


def test_zero_saturation_makes_every_channel_the_pixel_s_grey() -> None:
    out = augment(images(), uniforms(4, saturation=0.0), ("color",))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_shifts_span_the_eighth_of_the_side_both_ways() -> None:
    u = torch.tensor([0.0, 0.5, 0.9999])
    assert shifts(u, 16).tolist() == [-2, 0, 2]  # 16 x 0.125 = 2 pixels either way


def test_translation_moves_the_image_either_way_along_either_axis_and_fills_with_zero() -> None:
    x = images()
    right = augment(x, uniforms(4, dx=0.9999), ("translation",))  # +2 pixels along x
    assert torch.equal(right[..., 2:], x[..., :-2]) and not right[..., :2].any()
    up = augment(x, uniforms(4, dy=0.0), ("translation",))  # -2 pixels along y
    assert torch.equal(up[:, :, :-2], x[:, :, 2:]) and not up[:, :, -2:].any()
    down = augment(x, uniforms(4, dy=0.9999), ("translation",))  # +2 pixels along y
    assert torch.equal(down[:, :, 2:], x[:, :, :-2]) and not down[:, :, :2].any()


def test_shifts_and_cutout_centres_come_from_fp32_uniforms_under_bf16_images() -> None:
    """bf16 has 8 bits of mantissa: uniforms rounded to it would bin shifts unevenly and put some cutout
    centres on the edge (u rounded up to 1.0). The images take bf16, the draws do not."""
    x = images().to(torch.bfloat16)
    u = uniforms(4, dx=0.9999, cy=0.5, cx=0.5)
    out = augment(x, u, ("translation",))
    assert out.dtype == torch.bfloat16 and torch.equal(out[..., 2:], x[..., :-2])  # 0.9999 in bf16 is 1.0
    assert augment(x, u, ("color", "cutout")).dtype == torch.bfloat16


def test_cutout_zeroes_one_square_of_half_the_side() -> None:
    x = images().abs() + 0.1  # no pixel is zero before
    out = augment(x, uniforms(4, cy=0.5, cx=0.5), ("cutout",))
    zeroed = (out == 0).all(dim=1)  # (N, H, W)
    assert zeroed.sum(dim=(1, 2)).tolist() == [64] * 4  # 8 x 8 of 16 x 16
    assert zeroed[:, 4:12, 4:12].all()


def test_gradients_reach_the_input_through_every_policy() -> None:
    """G learns through D's augmented view of its images: the augmentation must be differentiable."""
    x = images().requires_grad_(True)
    u = torch.rand(4, UNIFORMS, generator=torch.Generator().manual_seed(2))
    augment(x, u, ("color", "translation", "cutout")).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_policy_names_are_checked_and_put_in_application_order() -> None:
    assert augment_policy("cutout, color") == ("color", "cutout")
    assert augment_policy("") == ()
    with pytest.raises(ConfigError, match="loss.augment: must be a comma-separated subset of color,translation,cutout"):
        augment_policy("color,flip")


def test_a_step_s_draws_are_the_same_on_any_number_of_ranks_and_at_resume() -> None:
    device = torch.device("cpu")
    one = augment_draws(seed=3, global_batch=8, rank=0, world_size=1, device=device)
    whole = [one.draw() for _ in range(3)]
    assert whole[0].shape == (len(PASSES), 8, UNIFORMS) and not torch.equal(whole[0], whole[1])
    halves = [augment_draws(seed=3, global_batch=8, rank=r, world_size=2, device=device) for r in (0, 1)]
    for step in range(3):
        assert torch.equal(torch.cat([h.draw() for h in halves], dim=1), whole[step])
    resumed = augment_draws(seed=3, global_batch=8, rank=0, world_size=1, device=device, at=2)
    assert torch.equal(resumed.draw(), whole[2])
    real, fake_for_d, fake_for_g = whole[0]  # each pass of a step has its own draw
    assert not torch.equal(real, fake_for_d) and not torch.equal(fake_for_d, fake_for_g)


def test_a_step_with_augmentation_trains_d_on_other_images_than_one_without(tmp_path: Path) -> None:
    """The option reaches D: from the same weights and inputs, one step with loss.augment moves D elsewhere,
    and another step at the same step, its policies listed in another order, draws the same augmentation."""
    from helpers import CPU, tiny_config

    from dcgan.gan.step import build_step

    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))

    def d_after_one_step(*overrides: str) -> dict[str, torch.Tensor]:
        _, d, step = build_step(tiny_config(tmp_path, "train.batch_size=8", *overrides), CPU)
        step(images)
        return {k: v.detach().clone() for k, v in d.state_dict().items()}

    plain = d_after_one_step()
    augmented = d_after_one_step("loss.augment=color,translation,cutout")
    assert all(
        torch.equal(v, augmented[k]) for k, v in d_after_one_step("loss.augment=cutout,color,translation").items()
    )
    assert any(not torch.equal(v, plain[k]) for k, v in augmented.items() if v.is_floating_point())
