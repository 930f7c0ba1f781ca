"""Generators outside training: load one from a run directory or an exported file, make image grids.

An exported generator is a plain `torch.save` of tensors and plain data (no pickled classes), so it loads
with `torch.load(path, weights_only=True)` anywhere the `dcgan` package is installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchvision.utils import make_grid, save_image

from dcgan import schema
from dcgan.checkpoint import read_newest
from dcgan.config import ConfigError, ModelConfig
from dcgan.models import Generator

EXPORT_FORMAT = "dcgan-generator/1"


@dataclasses.dataclass
class LoadedGenerator:
    generator: Generator
    model: ModelConfig
    step: int
    fixed_noise: torch.Tensor


def to_uint8_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> one uint8 (H, W, 3) grid, as wandb and PNG files want it."""
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: Path) -> None:
    """Write images in [-1, 1] as one PNG grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, int(len(images) ** 0.5))
    save_image(images.detach().float().cpu(), str(path), nrow=nrow, normalize=True, value_range=(-1, 1))


@torch.no_grad()
def generate(generator: Generator, noise: torch.Tensor) -> torch.Tensor:
    """G(noise) in eval mode (BatchNorm running statistics), as sample grids and evaluation use it."""
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            return generator(noise)
    finally:
        generator.train(was_training)


def load_from_run(run_dir: Path) -> LoadedGenerator:
    """The generator of the newest complete checkpoint of a run directory that reads back (an older one,
    with a warning, when the newest is damaged)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    loaded = read_newest(run_dir / "checkpoints", load_generator_checkpoint)
    if loaded is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint yet")
    return loaded


def load_generator_checkpoint(checkpoint: Path) -> LoadedGenerator:
    """G, its step and the fixed noise from one DCP checkpoint, read in this process."""
    model = checkpoint_model(checkpoint)
    generator = Generator(model)
    reader = dcp.FileSystemReader(str(checkpoint))
    noise_meta = reader.read_metadata().state_dict_metadata[schema.FIXED_NOISE]
    assert isinstance(noise_meta, TensorStorageMetadata), "fixed_noise is stored as a tensor"
    state = schema.generator_part(generator, tuple(noise_meta.size))
    dcp.load(state, storage_reader=reader, no_dist=True)
    generator.load_state_dict(state[schema.MODEL]["G"])
    return LoadedGenerator(generator, model, int(state[schema.PROGRESS]["step"]), state[schema.FIXED_NOISE])


def checkpoint_model(checkpoint: Path) -> ModelConfig:
    """The model settings a checkpoint was written with (its own copy of the config): config.yaml may
    describe another model, e.g. after a resume with other settings was refused."""
    saved = schema.saved_config(checkpoint, lambda path, state: dcp.load(state, checkpoint_id=str(path), no_dist=True)).get("model", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def export_generator(loaded: LoadedGenerator, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "model": dataclasses.asdict(loaded.model),
            "step": loaded.step,
            "state_dict": loaded.generator.state_dict(),
            "fixed_noise": loaded.fixed_noise,
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
    return LoadedGenerator(generator, model, int(blob["step"]), blob["fixed_noise"])


def load_generator(source: Path) -> LoadedGenerator:
    """A run directory or an exported generator file."""
    if source.is_dir():
        return load_from_run(source)
    if source.is_file():
        return load_export(source)
    raise ConfigError(f"{source}: no such run directory or generator file")


def sample_grid(source: Path, num: int, out: Path, seed: int | None) -> Path:
    """`dcgan sample`: `num` images from seeded noise as one PNG grid; with no seed, from the training's
    fixed noise (its first `num` vectors), which redraws the run's own sample grid of that step."""
    loaded = load_generator(source)
    if seed is None:
        if num > len(loaded.fixed_noise):
            raise ConfigError(f"--fixed-noise: the run has {len(loaded.fixed_noise)} fixed noise vectors, asked for --num {num}")
        noise = loaded.fixed_noise[:num].cpu()
    else:
        noise = torch.randn(num, loaded.model.nz, generator=torch.Generator().manual_seed(seed))
    save_grid(generate(loaded.generator, noise), out)
    return out
