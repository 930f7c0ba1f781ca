"""Generators outside training: load one from a run directory or an exported file, make image grids.

An exported generator is a plain `torch.save` of tensors and plain data (no pickled classes), so it loads
with `torch.load(path, weights_only=True)` anywhere the `dcgan` package is installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from dcgan.config import BN_STATS, ConfigError, ModelConfig
from dcgan.gan.ema import refresh_batchnorm_statistics
from dcgan.gan.models import Generator, spectral_norm_vectors_kept
from dcgan.run import schema
from dcgan.run.checkpoint import load_in_process, read_newest, stored_shapes
from dcgan.run.rundir import RunDir

EXPORT_FORMAT = "dcgan-generator/1"
WEIGHTS = ("raw", "ema")
"""Which of a run's generators: the trained G, or the average of its weights (train.ema)."""


Buffers = dict[str, torch.Tensor]
"""A module's buffers by name (BatchNorm running statistics and counts)."""


@dataclasses.dataclass
class LoadedGenerator:
    generator: Generator
    model: ModelConfig
    step: int
    fixed_noise: torch.Tensor
    bn: str = "running"
    """BatchNorm statistics its images are made with (config.BN_STATS): the run's sample.bn by default."""
    weights: str = "raw"
    """'raw' (the trained G) or 'ema' (the averaged weights, train.ema)."""

    standing: Buffers | None = None
    """Standing statistics of these weights, measured at the first image (bn='standing')."""

    def images(self, noise: torch.Tensor) -> torch.Tensor:
        """G(noise) in [-1, 1] with this generator's BatchNorm choice; standing statistics are measured
        once per LoadedGenerator, whose weights do not change while it makes images."""
        bn = statistics_to_use(self.bn, self.weights)
        if bn == "standing" and self.standing is None:
            self.standing = standing_statistics(self.generator)
        return generate(self.generator, noise, bn, self.standing)


def statistics_to_use(bn: str, weights: str) -> str:
    """The statistics that make `bn`'s images for `weights`. The average of G always holds standing
    statistics as its running ones (re-estimated from its weights on the same fixed latents, see
    dcgan.gan.ema), so 'standing' reads them instead of measuring the same numbers again."""
    return "running" if bn == "standing" and weights == "ema" else bn


def to_uint8_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> one uint8 (H, W, 3) grid, as wandb and PNG files want it."""
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Write images in [-1, 1] as one PNG grid (`nrow` images a row; default: square)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    save_image(images.detach().float().cpu(), str(path), nrow=nrow, normalize=True, value_range=(-1, 1))


@contextmanager
def batchnorm_statistics(generator: torch.nn.Module, bn: str) -> Iterator[None]:
    """G set to make images with `bn` statistics: 'running' = eval mode; 'batch' = each batch's own
    statistics (train mode) without touching the stored running averages. Restored afterwards.
    ('standing' is running statistics measured first: see `generate`.) A G with cross-rank BatchNorm
    (training on several ranks) gives batch statistics through a collective: make images in 'batch'
    or 'standing' mode from a plain copy (`plain_copy`). A spectral norm's vectors (model.spectral_norm=both)
    are restored too."""
    if bn not in BN_STATS:
        raise ConfigError(f"BatchNorm statistics: {bn!r} is not one of {', '.join(BN_STATS)}")
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was_training, tracked = generator.training, [m.track_running_stats for m in norms]
    generator.train(bn == "batch")
    for m in norms:
        m.track_running_stats = bn != "batch"
    try:
        with spectral_norm_vectors_kept(generator):  # train mode: a spectral norm's power iteration is undone
            yield
    finally:
        generator.train(was_training)
        for m, track in zip(norms, tracked, strict=True):
            m.track_running_stats = track


@torch.no_grad()
def standing_statistics(generator: Generator) -> Buffers:
    """G's BatchNorm statistics re-estimated from its own outputs on fixed latents (the average's
    `refresh_batchnorm_statistics`), returned; G's own buffers are left as they were.

    Why: running averages of the statistics trail a generator that moves fast (momentum 0.1: the last
    ~10 steps, of a G that differed at each), and images made with them can be far worse than the same
    weights deserve; statistics measured on the current weights cannot lag them."""
    stored = {name: buffer.clone() for name, buffer in generator.named_buffers()}
    refresh_batchnorm_statistics(generator, generator.nz)
    standing = {name: buffer.clone() for name, buffer in generator.named_buffers()}
    _copy_buffers(generator, stored)
    return standing


def _copy_buffers(module: torch.nn.Module, buffers: Buffers) -> None:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])


@torch.no_grad()
def generate(
    generator: torch.nn.Module, noise: torch.Tensor, bn: str = "running", standing: Buffers | None = None
) -> torch.Tensor:
    """G(noise) in [-1, 1], its BatchNorm using `bn` statistics (see batchnorm_statistics); for
    'standing', `standing` (from `standing_statistics`) or, when None, statistics measured now."""
    if bn != "standing":
        with batchnorm_statistics(generator, bn):
            return generator(noise)
    assert isinstance(generator, Generator), "standing statistics are measured on a Generator (its nz)"
    stored = {name: buffer.clone() for name, buffer in generator.named_buffers()}
    _copy_buffers(generator, standing if standing is not None else standing_statistics(generator))
    try:
        return generate(generator, noise, "running")
    finally:
        _copy_buffers(generator, stored)


def plain_copy(generator: torch.nn.Module, model: ModelConfig) -> Generator:
    """A copy of `generator`'s state in a Generator with plain BatchNorm (no collectives)."""
    device = next(generator.parameters()).device
    copy = Generator(model).to(device)
    copy.load_state_dict(generator.state_dict())
    return copy


def load_from_run(run_dir: Path, weights: str | None = None) -> LoadedGenerator:
    """The generator of the newest complete checkpoint of a run directory that reads back (an older one,
    with a warning, when the newest is damaged); `weights` as in load_generator_checkpoint."""
    layout = RunDir(run_dir)
    layout.require_config()
    loaded = read_newest(layout.checkpoints, lambda path: load_generator_checkpoint(path, weights))
    if loaded is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint yet")
    return loaded


def load_generator_checkpoint(checkpoint: Path, weights: str | None = None) -> LoadedGenerator:
    """G, its step and the fixed noise from one DCP checkpoint, read in this process. `weights`: 'ema'
    or 'raw'; None = what the run made its images with (the average when it kept one and sample.ema)."""
    saved = schema.saved_config(checkpoint, load_in_process)
    model = schema.model_of(saved)
    sample = saved.get("sample", {})
    stored = stored_shapes(checkpoint)
    has_ema = schema.has_ema(stored)
    if weights is None:
        weights = "ema" if has_ema and sample.get("ema", True) else "raw"
    if weights == "ema" and not has_ema:
        raise ConfigError(f"{checkpoint} holds no averaged generator (trained with train.ema=0): use the raw one")
    generator = Generator(model)
    noise_shape = stored[schema.FIXED_NOISE]
    assert noise_shape is not None, "fixed_noise is stored as a tensor"
    state = schema.generator_part(generator, noise_shape)
    if weights == "ema":
        state.update(schema.ema_part(generator))
    load_in_process(checkpoint, state)
    generator.load_state_dict(state[schema.MODEL]["G"])
    if weights == "ema":
        with torch.no_grad():
            for name, p in generator.named_parameters():
                p.copy_(state[schema.EMA]["params"][name])
        refresh_batchnorm_statistics(generator, model.nz)
    return LoadedGenerator(
        generator,
        model,
        int(state[schema.PROGRESS]["step"]),
        state[schema.FIXED_NOISE],
        bn=str(sample.get("bn", "running")),
        weights=weights,
    )


def export_generator(loaded: LoadedGenerator, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "model": dataclasses.asdict(loaded.model),
            "step": loaded.step,
            "state_dict": loaded.generator.state_dict(),
            "fixed_noise": loaded.fixed_noise,
            "bn": loaded.bn,
            "weights": loaded.weights,
        },
        out,
    )


def load_export(path: Path) -> LoadedGenerator:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ConfigError(f"{path} is not a generator exported by `dcgan export` ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path} is not a generator exported by `dcgan export`")
    model = ModelConfig(**blob["model"])
    generator = Generator(model)
    generator.load_state_dict(blob["state_dict"])
    # files exported before the BatchNorm choice and the average existed: running statistics, raw G
    return LoadedGenerator(
        generator,
        model,
        int(blob["step"]),
        blob["fixed_noise"],
        bn=str(blob.get("bn", "running")),
        weights=str(blob.get("weights", "raw")),
    )


def load_generator(source: Path, *, weights: str | None = None, bn: str | None = None) -> LoadedGenerator:
    """A run directory or an exported generator file. `weights` ('ema'/'raw', run directories only)
    and `bn` (config.BN_STATS) override what the run chose (sample.ema, sample.bn)."""
    if source.is_dir():
        loaded = load_from_run(source, weights)
    elif source.is_file():
        loaded = load_export(source)
        if weights is not None and weights != loaded.weights:
            raise ConfigError(
                f"{source} holds the {loaded.weights} generator only: export the {weights} one from its run directory"
            )
    else:
        raise ConfigError(f"{source}: no such run directory or generator file")
    if bn is not None:
        loaded.bn = bn
    return loaded


def seeded_latents(nz: int, num: int, seed: int) -> torch.Tensor:
    """The latents of `dcgan sample --seed SEED --num NUM`, in grid order: what `dcgan arithmetic`'s
    indices and `dcgan interpolate`'s endpoints are drawn from."""
    return torch.randn(num, nz, generator=torch.Generator().manual_seed(seed))


def sample_grid(loaded: LoadedGenerator, num: int, out: Path, seed: int | None) -> Path:
    """`dcgan sample`: `num` images from seeded noise as one PNG grid; with no seed, from the training's
    fixed noise (its first `num` vectors), which redraws the run's own sample grid of that step."""
    if seed is None:
        if num > len(loaded.fixed_noise):
            raise ConfigError(
                f"--fixed-noise: the run has {len(loaded.fixed_noise)} fixed noise vectors, asked for --num {num}"
            )
        noise = loaded.fixed_noise[:num].cpu()
    else:
        noise = seeded_latents(loaded.model.nz, num, seed)
    save_grid(loaded.images(noise), out)
    return out
