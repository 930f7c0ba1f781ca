"""The paper's latent-space results: walks between latent vectors (Radford et al. 2015, figure 4) and
vector arithmetic on averaged latents (section 6.3).

Latents are named the way `dcgan sample` draws them: `--seed S --num N` is the (N, nz) standard normal
batch of that seed, row-major in the grid, so an index picked from a sample grid names its latent here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dcgan.config import ConfigError
from dcgan.evaluation.generators import LoadedGenerator, save_grid, seeded_latents, to_uint8_grid

WALKS: tuple[str, ...] = ("slerp", "lerp")
ARITHMETIC_JITTER = 0.25
"""The paper's figure 7: the result vector, and copies with uniform noise of this scale added."""


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of `a` and `b` at fractions `t` (T,): (T, N, nz). It keeps the
    norm a Gaussian latent typically has (~sqrt(nz)); a straight line passes through lower-norm latents,
    which G rarely saw in training (White 2016, "Sampling Generative Networks")."""
    unit_a, unit_b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.arccos((unit_a * unit_b).sum(-1).clamp(-1, 1))  # (N,)
    sin = torch.sin(omega).clamp_min(1e-8)
    t = t[:, None, None]
    out = torch.sin((1 - t) * omega[:, None]) / sin[:, None] * a + torch.sin(t * omega[:, None]) / sin[:, None] * b
    straight = omega < 1e-4  # (nearly) parallel: the line is the arc
    return torch.where(straight[None, :, None], (1 - t) * a + t * b, out)


def walk_latents(start: torch.Tensor, end: torch.Tensor, steps: int, kind: str) -> torch.Tensor:
    """(steps, N, nz) latents from `start` to `end`, whose first and last steps are exactly the endpoints."""
    if kind not in WALKS:
        raise ConfigError(f"--path {kind}: must be one of {', '.join(WALKS)}")
    if steps < 2:
        raise ConfigError(f"--steps {steps}: a walk needs at least its 2 endpoints")
    t = torch.linspace(0, 1, steps)
    path = slerp(start, end, t) if kind == "slerp" else (1 - t)[:, None, None] * start + t[:, None, None] * end
    path[0], path[-1] = start, end
    return path


@dataclass(frozen=True)
class Walks:
    """`rows` walks of `steps` images each, and the latents they run between."""

    images: torch.Tensor
    """(rows, steps, C, H, W) in [-1, 1]."""
    start: torch.Tensor
    end: torch.Tensor


def interpolate(loaded: LoadedGenerator, rows: int, steps: int, seed: int, kind: str) -> Walks:
    """Walks between pairs of seeded random latents: row r from latent 2r to latent 2r + 1 of the seed."""
    latents = seeded_latents(loaded.model.nz, 2 * rows, seed)
    start, end = latents[0::2], latents[1::2]
    path = walk_latents(start, end, steps, kind)  # (steps, rows, nz)
    images = loaded.images(path.transpose(0, 1).reshape(rows * steps, -1))
    return Walks(images.reshape(rows, steps, *images.shape[1:]), start, end)


def save_walks(walks: Walks, out: Path, frame_ms: int = 80) -> Path:
    """A PNG grid (one walk per row) or, for .gif, an animation whose frame k shows every walk's step k,
    played forth and back."""
    rows, steps = walks.images.shape[:2]
    if out.suffix.lower() == ".gif":
        frames = [Image.fromarray(to_uint8_grid(walks.images[:, k], nrow=min(rows, 8))) for k in range(steps)]
        frames += frames[-2:0:-1]
        out.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(out, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
        return out
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: write a .png grid or a .gif animation")
    flat = walks.images.reshape(rows * steps, *walks.images.shape[2:])
    save_grid(flat, out, nrow=steps)
    return out


def parse_indices(text: str, option: str, num: int) -> list[int]:
    """'3,17,22' -> [3, 17, 22], each an index into a grid of `num` images."""
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated image indices, e.g. 3,17,22") from None
    if not indices:
        raise ConfigError(f"{option}: give at least one image index")
    wrong = [i for i in indices if not 0 <= i < num]
    if wrong:
        raise ConfigError(f"{option}: index {wrong[0]} is outside the grid of --num {num} (0..{num - 1})")
    return indices


@dataclass(frozen=True)
class Arithmetic:
    """mean(z_a) - mean(z_b) + mean(z_c), and the grid that shows it."""

    result: torch.Tensor
    """(nz,) the result vector."""
    rows: list[torch.Tensor]
    """Images in [-1, 1]: a's, b's and c's images each followed by their average latent's image; then
    G(result) and G(result + uniform jitter)."""


def arithmetic(
    loaded: LoadedGenerator, seed: int, num: int, a: list[int], b: list[int], c: list[int], results: int = 8
) -> Arithmetic:
    """The paper's vector arithmetic (e.g. smiling woman - neutral woman + neutral man = smiling man),
    on latents picked by index from `dcgan sample --seed SEED --num NUM`."""
    latents = seeded_latents(loaded.model.nz, num, seed)
    means = [latents[group].mean(0) for group in (a, b, c)]
    result = means[0] - means[1] + means[2]
    jitter = (
        torch.rand(results - 1, result.numel(), generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    ) * ARITHMETIC_JITTER
    rows = [
        loaded.images(torch.cat([latents[group], mean[None]])) for group, mean in zip((a, b, c), means, strict=True)
    ]
    rows.append(loaded.images(torch.cat([result[None], result[None] + jitter])))
    return Arithmetic(result, rows)


def save_arithmetic(found: Arithmetic, out: Path) -> Path:
    """One grid, one row per operand (its images, then its average's) and a row of results; short rows
    are padded with black."""
    width = max(len(row) for row in found.rows)
    padded = [torch.cat([row, -torch.ones(width - len(row), *row.shape[1:])]) for row in found.rows]
    save_grid(torch.cat(padded), out, nrow=width)
    return out
