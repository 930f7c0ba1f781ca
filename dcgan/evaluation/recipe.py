"""The pytorch/examples DCGAN recipe as a training arm of `dcgan compare` (`--a recipe` or `--b recipe`).

Why: "at least as good as pytorch/examples" is a claim users check. Here the recipe trains on the same
images, at the same seed, for the same steps and batch size, and is scored by the same metric as the
project's arm, so that "project vs recipe" is one command with error bars.

What the recipe is (pytorch/examples/dcgan/main.py): the paper's G and D with normal(0, 0.02) init and
a Sigmoid on D (`bench.ReferenceStep`, the same iteration the step benchmark times), BCELoss, Adam
(optim.lr, optim.beta1/beta2; the options beyond the paper, loss.kind, model.spectral_norm, model.d_norm and per-network
lrs and betas, do not apply to it), fp32 eager on one device; its data a DataLoader with shuffle=True over the
whole data set in memory, i.e. one fresh permutation per epoch, the last partial batch included; its
images made in train mode, i.e. with each batch's own BatchNorm statistics (`sample.bn=batch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dcgan.config import Config
from dcgan.data.digits import digits_images
from dcgan.data.offline import read_images
from dcgan.evaluation.generators import LoadedGenerator, export_generator, load_export
from dcgan.files import atomic_path

RECIPE = "recipe"
"""The value of --a / --b that selects this arm instead of overrides."""
EXPORT = "generator.pt"
"""The recipe's trained G in a run directory, as `dcgan export` writes one (the scorer loads it)."""


def all_images(config: Config) -> torch.Tensor:
    """Every training image of the config's data, uint8 (N, C, R, R), in memory as the recipe keeps them."""
    m = config.model
    if config.uses_builtin_digits:
        return digits_images(m.resolution)
    found = read_images(config.data.shards, m.resolution, m.channels)
    return torch.from_numpy(np.stack([found[i] for i in sorted(found)]))


def permuted_batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """DataLoader(shuffle=True, drop_last=False): a new permutation each epoch, batches cut from it in
    order, the last one smaller; endless."""
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            yield images[order[start : start + batch_size]]


def train_recipe(config: Config, run_dir: Path) -> Path:
    """Train the recipe for train.steps steps of train.batch_size images (seeded by config.seed) and
    write its G to run_dir/generator.pt; a finished run is reused. Returns the file."""
    from dcgan.gan.reference import ReferenceStep

    out = run_dir / EXPORT
    if out.is_file():
        return out
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu")
    step = ReferenceStep(config, device)
    batches = permuted_batches(all_images(config), config.train.batch_size, torch.Generator().manual_seed(config.seed))
    for _ in range(config.train.steps):
        step(next(batches).to(device))
    fixed = torch.randn(config.sample.num, config.model.nz, generator=torch.Generator().manual_seed(config.seed))
    loaded = LoadedGenerator(step.g.cpu(), step.model, config.train.steps, fixed, bn="batch", weights="raw")
    with atomic_path(out) as partial:  # a killed comparison never leaves a half-written generator that looks finished
        export_generator(loaded, partial)
    return out


def recipe_generator(run_dir: Path) -> LoadedGenerator:
    """The recipe's trained G, making images as the recipe does (batch statistics)."""
    return load_export(run_dir / EXPORT)
