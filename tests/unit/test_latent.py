"""Latent-space walks and vector arithmetic (the paper's figure 4 and section 6.3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, run_in_process
from PIL import Image

from dcgan.config import ConfigError, load_config
from dcgan.evaluation.generators import LoadedGenerator, export_generator, generate, seeded_latents
from dcgan.evaluation.latent import arithmetic, interpolate, parse_indices, slerp, walk_latents
from dcgan.gan.models import Generator


@pytest.fixture(scope="module")
def generator() -> LoadedGenerator:
    model = load_config(TINY).model
    torch.manual_seed(0)
    g = Generator(model)
    with torch.no_grad():  # running statistics that are not the identity, as after training
        for m in g.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return LoadedGenerator(g, model, 0, torch.zeros(1, model.nz))


def test_walks_start_and_end_exactly_at_their_latents_and_slerp_keeps_the_norm() -> None:
    a, b = seeded_latents(100, 4, 0)[:2], seeded_latents(100, 4, 0)[2:]
    for kind in ("slerp", "lerp"):
        path = walk_latents(a, b, 7, kind)
        assert path.shape == (7, 2, 100) and torch.equal(path[0], a) and torch.equal(path[-1], b)
    middle = slerp(a, b, torch.tensor([0.5]))[0]
    straight = walk_latents(a, b, 3, "lerp")[1]
    ends = (a.norm(dim=1) + b.norm(dim=1)) / 2
    assert (middle.norm(dim=1) - ends).abs().max() < 0.05 * ends.min()  # on the sphere between them
    assert (straight.norm(dim=1) < 0.85 * ends).all()  # ~sqrt(1/2) of it for near-orthogonal latents
    with pytest.raises(ConfigError, match="at least its 2 endpoints"):
        walk_latents(a, b, 1, "slerp")


def test_interpolation_endpoints_are_the_images_of_z0_and_z1(generator: LoadedGenerator) -> None:
    walks = interpolate(generator, rows=3, steps=5, seed=11, kind="slerp")
    assert walks.images.shape == (3, 5, 1, 16, 16)
    assert torch.equal(walks.start, seeded_latents(16, 6, 11)[0::2])
    torch.testing.assert_close(walks.images[:, 0], generate(generator.generator, walks.start), rtol=0, atol=1e-6)
    torch.testing.assert_close(walks.images[:, -1], generate(generator.generator, walks.end), rtol=0, atol=1e-6)
    assert (walks.images[:, 1:] - walks.images[:, :-1]).abs().amax() > 0  # it moves


def test_arithmetic_is_a_minus_b_plus_c_of_averaged_latents(generator: LoadedGenerator) -> None:
    latents = seeded_latents(16, 64, 5)
    found = arithmetic(generator, seed=5, num=64, a=[1, 2, 3], b=[4, 5], c=[6])
    want = latents[[1, 2, 3]].mean(0) - latents[[4, 5]].mean(0) + latents[6]
    torch.testing.assert_close(found.result, want)
    assert [len(row) for row in found.rows] == [4, 3, 2, 8]
    torch.testing.assert_close(found.rows[3][0], generate(generator.generator, want[None])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        found.rows[1][-1], generate(generator.generator, latents[[4, 5]].mean(0)[None])[0], rtol=0, atol=1e-6
    )
    with pytest.raises(ConfigError, match="--b: index 64 is outside the grid of --num 64"):
        parse_indices("1,64", "--b", 64)


def test_the_commands_write_a_grid_an_animation_and_refuse_bad_indices(
    generator: LoadedGenerator, tmp_path: Path
) -> None:
    source = tmp_path / "g.pt"
    export_generator(generator, source)
    run_in_process(
        "interpolate", str(source), "--out", str(tmp_path / "walk.png"), "--rows", "3", "--steps", "5", "--seed", "1"
    )
    assert Image.open(tmp_path / "walk.png").size == (5 * 18 + 2, 3 * 18 + 2)
    run_in_process(
        "interpolate", str(source), "--out", str(tmp_path / "walk.gif"), "--rows", "2", "--steps", "6", "--path", "lerp"
    )
    assert Image.open(tmp_path / "walk.gif").n_frames == 2 * 6 - 2  # forth and back
    run_in_process(
        "arithmetic",
        str(source),
        "--seed",
        "2",
        "--a",
        "0,1",
        "--b",
        "2",
        "--c",
        "3",
        "--out",
        str(tmp_path / "sum.png"),
    )
    assert Image.open(tmp_path / "sum.png").size == (8 * 18 + 2, 4 * 18 + 2)
    bad = run_in_process(
        "arithmetic",
        str(source),
        "--seed",
        "2",
        "--a",
        "0,x",
        "--b",
        "2",
        "--c",
        "3",
        "--out",
        str(tmp_path / "x.png"),
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "dcgan: error: --a '0,x': expected comma-separated"
    )
