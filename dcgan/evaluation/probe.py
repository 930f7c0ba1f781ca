"""The paper's representation-learning result (Radford et al. 2015, section 5.1): a linear classifier on
the discriminator's features, trained with few labels per class.

Every hidden layer's activations are max-pooled to a 4x4 grid, flattened and concatenated; an
L2-regularized logistic regression (scikit-learn) is fitted on `labels` images per class and scored on
all the others. The features are not standardized: their scales are part of what D learned. On the
digits (32x32 D, 5 labels per class, 6 draws), standardized features gave D's features and an untrained
D's random ones nearly equal weight and accuracy (0.878 vs 0.869 after 2,000 steps); raw, they gave
0.882 vs 0.770, and 0.877 vs 0.787 after 300 steps. The same probe on an untrained D of the same architecture (the run's own initialization,
seed included) is the baseline: what the features owe to training rather than to the architecture.
Each score is repeated over several seeded draws of the labelled images, so that it has a spread.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan.config import ConfigError, ModelConfig
from dcgan.evaluation.spread import Spread
from dcgan.gan.models import Discriminator
from dcgan.pixels import from_uint8
from dcgan.run import schema
from dcgan.run.checkpoint import load_in_process, read_newest
from dcgan.run.rundir import RunDir

POOLED_SIDE = 4
"""Each layer's activations are max-pooled to POOLED_SIDE x POOLED_SIDE, as in the paper."""
PROBE_ITERATIONS = 3000
"""L-BFGS iterations of the probe's fit."""


@dataclass
class LoadedDiscriminator:
    discriminator: Discriminator
    model: ModelConfig
    step: int
    seed: int
    """The run's seed: an untrained D with it is the run's own initialization."""


def load_discriminator_checkpoint(checkpoint: Path) -> LoadedDiscriminator:
    saved = schema.saved_config(checkpoint, load_in_process)
    model = schema.model_of(saved)
    d = Discriminator(model)
    state: dict[str, Any] = {schema.MODEL: {"D": d.state_dict()}, schema.PROGRESS: {"step": 0}}
    load_in_process(checkpoint, state)
    d.load_state_dict(state[schema.MODEL]["D"])
    return LoadedDiscriminator(d, model, int(state[schema.PROGRESS]["step"]), int(saved.get("seed", 0)))


def load_discriminator(run_dir: Path) -> LoadedDiscriminator:
    """D of a run directory's newest complete checkpoint (exported files hold only G)."""
    layout = RunDir(run_dir)
    if not layout.config.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.yaml): the probe needs D, which only checkpoints hold"
        )
    loaded = read_newest(layout.checkpoints, load_discriminator_checkpoint)
    if loaded is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint yet")
    return loaded


def untrained_like(loaded: LoadedDiscriminator) -> Discriminator:
    """D as the run initialized it (models are built under torch.manual_seed(config.seed), G first)."""
    from dcgan.gan.models import Generator

    torch.manual_seed(loaded.seed)
    Generator(loaded.model)
    return Discriminator(loaded.model)


@torch.no_grad()
def features(d: Discriminator, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """uint8 images (N, C, R, R) -> (N, F): every hidden activation (after each LeakyReLU) max-pooled to
    4x4 and concatenated. D runs in eval mode (its running BatchNorm statistics)."""
    d.eval()
    out = []
    for start in range(0, len(images), batch):
        x = from_uint8(images[start : start + batch])
        pooled = []
        for layer in d.main:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                pooled.append(F.adaptive_max_pool2d(x, POOLED_SIDE).flatten(1))
        out.append(torch.cat(pooled, dim=1))
    return torch.cat(out).double().numpy()


def labelled_images(data: str, resolution: int, channels: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images and class labels of the built-in digits or of a shard directory (shards store labels)."""
    if data == "digits":
        from dcgan.data.digits import digits_images, load_digits_arrays

        return digits_images(resolution), load_digits_arrays()[1].astype(np.int64)
    from dcgan.data.offline import read_labelled

    images, labels, _ = read_labelled(data, resolution, channels)
    if len(set(labels.tolist())) < 2:
        raise ConfigError(
            f"--data {data}: the probe needs labelled images of at least 2 classes (shards of an image folder have none)"
        )
    return torch.from_numpy(images), labels


def split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `per_class` random images of each class for training, and of all the others for testing."""
    rng = np.random.default_rng(seed)
    train = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) <= per_class:
            raise ConfigError(
                f"--labels {per_class}: class {cls} has only {len(members)} images (some are needed for testing)"
            )
        train.extend(rng.choice(members, per_class, replace=False).tolist())
    train_idx = np.sort(np.asarray(train))
    return train_idx, np.setdiff1d(np.arange(len(labels)), train_idx)


def probe_accuracy(feats: np.ndarray, labels: np.ndarray, per_class: int, seed: int, c: float = 1.0) -> float:
    """Test accuracy of an L2-regularized logistic regression on the raw features (one BLAS thread: the
    same result on any machine, as in dcgan.evaluation.digits_score)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    train, test = split(labels, per_class, seed)
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the cap below is the fit's definition, not a failure
        classifier = LogisticRegression(C=c, max_iter=PROBE_ITERATIONS).fit(feats[train], labels[train])
        return float((classifier.predict(feats[test]) == labels[test]).mean())


@dataclass(frozen=True)
class ProbeResult:
    step: int
    per_class: int
    trained: list[float]
    untrained: list[float]
    feature_dim: int
    test_images: int

    def gain(self) -> Spread:
        """Trained minus untrained accuracy, paired by draw."""
        return Spread.of([t - u for t, u in zip(self.trained, self.untrained, strict=True)])

    def summary(self) -> str:
        return (
            f"linear probe, {self.per_class} labels per class, {self.feature_dim} features, {self.test_images} test images, "
            f"{len(self.trained)} draws of the labelled set (mean +- std):\n"
            f"  D of step {self.step:<8} accuracy {Spread.of(self.trained)}\n"
            f"  untrained D     accuracy {Spread.of(self.untrained)}\n"
            f"  gain (paired)            {self.gain()}"
        )


def run_probe(run_dir: Path, data: str, per_class: int, draws: int = 3) -> ProbeResult:
    """`dcgan probe`: the probe on the run's D and on its untrained twin, over `draws` labelled sets."""
    loaded = load_discriminator(run_dir)
    images, labels = labelled_images(data, loaded.model.resolution, loaded.model.channels)
    trained_feats = features(loaded.discriminator, images)
    untrained_feats = features(untrained_like(loaded), images)
    seeds = range(draws)
    return ProbeResult(
        step=loaded.step,
        per_class=per_class,
        trained=[probe_accuracy(trained_feats, labels, per_class, seed) for seed in seeds],
        untrained=[probe_accuracy(untrained_feats, labels, per_class, seed) for seed in seeds],
        feature_dim=trained_feats.shape[1],
        test_images=len(labels) - per_class * len(np.unique(labels)),
    )
