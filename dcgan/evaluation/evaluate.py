"""Scoring generators: FID and KID with a user-supplied Inception network, SWD with none, the digits score.

- FID/KID use the TorchScript Inception of StyleGAN2-ADA and EDM (`inception-2015-12-05.pt`), which
  takes uint8 images (N, 3, H, W) and returns 2048-d pool features with `return_features=True`. It
  cannot be downloaded on every machine, so its path comes from `--inception` or DCGAN_INCEPTION.
- SWD is the sliced Wasserstein distance between 7x7 patches of Laplacian pyramids (Karras et al.
  2018): no pretrained network, so every run can be scored anywhere. Reported x1e3, averaged over levels.
- digits: the digits score of dcgan.evaluation.digits_score (Frechet distance at 8x8; lower is better).
Under torchrun each rank generates and featurizes its share of the images (the reference's too, once:
its features are cached by rank 0); features are gathered. `Evaluation.protocol` records what a number
was measured on: the generator's weights and BatchNorm statistics, image counts, seeds, how the
reference was chosen and the feature network's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dcgan.config import EVAL_METRICS, Config, ConfigError, metric_keys
from dcgan.distributed.collectives import any_rank
from dcgan.distributed.env import DistInfo
from dcgan.evaluation.generators import LoadedGenerator
from dcgan.evaluation.metrics import INCEPTION_ENV, fid, kid, load_inception, swd
from dcgan.files import atomic_path
from dcgan.pixels import from_uint8, to_uint8

# ---------------------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian pyramids


# ---------------------------------------------------------------------------------------------------
# Images in, numbers out

GENERATION_BATCH = 250
"""Generated images are made in batches of this many, batch i by rank i % world: the same batches
whatever the number of ranks, so that batch statistics (sample.bn=batch) do not depend on it either."""
NOISE_SEED, REFERENCE_SEED = 12345, 0
"""Seeds of the generated images' noise and of the random reference subset: fixed, so that numbers
compare across runs and steps."""
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0
SWD_PATCHES, SWD_DIRECTIONS, SWD_SEED = 64, 512, 0


@dataclass(frozen=True)
class Evaluation:
    """The metric values, and how they were measured: what a number needs to be compared with another."""

    results: dict[str, float]
    protocol: dict[str, Any]


def generated_images(
    loaded: LoadedGenerator, num: int, info: DistInfo, batch: int = GENERATION_BATCH, seed: int = NOISE_SEED
) -> torch.Tensor:
    """`num` generated uint8 images, identical on every rank; rank r makes batches r, r + world, ..."""
    m = loaded.model
    batches = -(-num // batch)
    noise = torch.randn(batches, batch, m.nz, generator=torch.Generator().manual_seed(seed))
    device = next(loaded.generator.parameters()).device
    mine = [to_uint8(loaded.images(z.to(device))) for z in noise[info.rank :: info.world_size]]
    local = (
        torch.stack(mine) if mine else torch.empty(0, batch, m.channels, m.resolution, m.resolution, dtype=torch.uint8)
    )
    return gather_rows(local, batches, info).flatten(0, 1)[:num]


def gather_rows(local: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Rows that rank r holds at positions r, r+W, ... back in their global order (every rank gets all)."""
    if not info.distributed:
        return local
    width = -(-total // info.world_size)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype)
    padded[: len(local)] = local
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded, group=info.flag_group)
    interleaved = torch.stack(parts, dim=1).reshape(width * info.world_size, *local.shape[1:])
    return interleaved[:total]


class Reference:
    """The real images generated ones are compared with: all of a data set, or a seeded random subset
    (never the first n in stored order, which would be a few shards' worth of whatever order they hold).
    The selection is known before any image is read, and the images are read only when first needed:
    FID/KID with cached reference features and no SWD read none."""

    def __init__(self, data: str, num: int, resolution: int, channels: int, seed: int) -> None:
        self.data, self.num, self.resolution, self.channels = data, num, resolution, channels
        self._images: torch.Tensor | None = None
        self.available = self._count()
        if self.available < num:
            raise ConfigError(f"--num {num}: {data} holds only {self.available} images")
        self.seed: int | None = None if num == self.available else seed
        """Seed of the subset; None when the whole data set is the reference."""

    def _count(self) -> int:
        if self.data == "digits":
            from dcgan.data.digits import load_digits_arrays

            return len(load_digits_arrays()[1])
        from dcgan.data.shards import resolve_shards

        shards = resolve_shards(self.data)
        manifest = shards.manifest
        if manifest is not None and (manifest.resolution, manifest.channels) != (self.resolution, self.channels):
            raise ConfigError(
                f"--data {self.data} holds {manifest.resolution}x{manifest.resolution} {manifest.channels}-channel images; "
                f"the generator makes {self.resolution}x{self.resolution} {self.channels}-channel ones"
            )
        if shards.total is not None:
            return shards.total
        self._images = self._read_all()  # no manifest counts: reading is the only way to know
        return len(self._images)

    def _read_all(self) -> torch.Tensor:
        if self.data == "digits":
            from dcgan.data.digits import digits_images

            return digits_images(self.resolution)
        from dcgan.data.offline import read_images

        found = read_images(self.data, self.resolution, self.channels)
        shape = (0, self.channels, self.resolution, self.resolution)
        return (
            torch.from_numpy(np.stack([found[i] for i in sorted(found)]))
            if found
            else torch.empty(shape, dtype=torch.uint8)
        )

    @property
    def images(self) -> torch.Tensor:
        """uint8 (num, C, R, R): the whole set in stored order, or the subset in the seed's order."""
        if self._images is None or len(self._images) != self.num:
            self._images = self._select()
        return self._images

    def _select(self) -> torch.Tensor:
        if self.seed is None:
            return self._images if self._images is not None else self._read_all()
        order = np.random.default_rng(self.seed).permutation(self.available)
        if self.data == "digits" or self._images is not None:
            every = self._images if self._images is not None else self._read_all()
            return every[torch.from_numpy(order[: self.num])]
        from dcgan.data.offline import read_images

        spare = min(self.available - self.num, max(16, self.num // 100))  # stand-ins for unreadable picks, same order
        wanted = order[: self.num + spare].tolist()
        found = read_images(self.data, self.resolution, self.channels, set(wanted))
        picked = [found[i] for i in wanted if i in found][: self.num]
        if len(picked) < self.num:
            raise ConfigError(
                f"--num {self.num}: only {len(picked)} of the {self.num} randomly chosen reference images of {self.data} are readable"
            )
        return torch.from_numpy(np.stack(picked))

    def describe(self) -> dict[str, Any]:
        chosen = "all" if self.seed is None else "seeded random subset"
        return {
            "data": self.data,
            "images": self.num,
            "available": self.available,
            "selection": chosen,
            "seed": self.seed,
        }


@lru_cache(maxsize=2)
def reference_images(data: str, num: int, resolution: int, channels: int, seed: int = REFERENCE_SEED) -> Reference:
    """The reference of `num` real images of a shard directory or the built-in digits: all of them when
    `num` is the data set's size, else a random subset drawn with `seed` (kept in memory, images
    included once read: training evaluates often)."""
    return Reference(data, num, resolution, channels, seed)


def network_hash(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def cache_key(data: str, reference: Reference, resolution: int, network_sha1: str) -> str:
    """Reference features are cached per data set (its manifest), images chosen, resolution and network."""
    manifest = Path(data) / "manifest.json"
    identity = manifest.read_text() if manifest.is_file() else data
    blob = json.dumps([identity, resolution, reference.num, reference.available, reference.seed, network_sha1])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def featurize(
    images: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor], batch: int = GENERATION_BATCH
) -> torch.Tensor:
    if not len(images):
        return torch.empty(0, 0, dtype=torch.float64)
    return torch.cat([features(images[i : i + batch]) for i in range(0, len(images), batch)])


def sharded_features(
    images: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor], info: DistInfo
) -> np.ndarray:
    """Features of `images`, each rank featurizing every world-th one; every rank gets all, in order."""
    mine = featurize(images[info.rank :: info.world_size], features)
    if info.distributed:  # a rank with no images still needs the width to take part in the gather
        width = torch.tensor([mine.shape[1] if len(mine) else 0])
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=info.flag_group)
        mine = mine if len(mine) else torch.empty(0, int(width), dtype=torch.float64)
    return gather_rows(mine, len(images), info).numpy()


def reference_features(
    reference: Reference, features: Callable[[torch.Tensor], torch.Tensor], path: Path, info: DistInfo
) -> np.ndarray:
    """The reference's features from the cache file when every rank sees it; else computed with the
    work shared by the ranks, and the file written by rank 0 alone (atomically)."""
    if not any_rank(not path.is_file(), info):
        return np.load(path)
    feats = sharded_features(reference.images, features, info)
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as file:
            np.save(file, feats)
    return feats


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCGAN_CACHE", Path.home() / ".cache" / "dcgan"))


def evaluate(
    loaded: LoadedGenerator,
    data: str,
    num: int,
    metrics: list[str],
    info: DistInfo,
    inception: str = "",
    cache_dir: Path | None = None,
) -> Evaluation:
    """Every requested metric of `loaded` against `num` real images, identical on every rank, with the
    protocol that produced them (images, seeds, selection, network)."""
    cache_dir = cache_dir or default_cache_dir()
    unknown = sorted(set(metrics) - set(EVAL_METRICS))
    if unknown:
        raise ConfigError(f"--metrics: unknown {', '.join(unknown)} (allowed: {', '.join(EVAL_METRICS)})")
    m = loaded.model
    fake = generated_images(loaded, num, info)
    reference = reference_images(data, num, m.resolution, m.channels)
    results: dict[str, float] = {}
    protocol: dict[str, Any] = {
        "generator": {
            "step": loaded.step,
            "weights": loaded.weights,
            "bn": loaded.bn,
            "images": num,
            "noise_seed": NOISE_SEED,
            "batch": GENERATION_BATCH,
        },
        "reference": reference.describe(),
        "ranks": info.world_size,
    }
    if "fid" in metrics or "kid" in metrics:
        network = inception or os.environ.get(INCEPTION_ENV, "")
        extract = load_inception(network, info.device)
        sha1 = network_hash(network)
        protocol["network"] = {"path": str(Path(network).resolve()), "sha1": sha1}
        real_feats = reference_features(
            reference, extract, cache_dir / f"ref-{cache_key(data, reference, m.resolution, sha1)}.npy", info
        )
        fake_feats = sharded_features(fake, extract, info)
        if "fid" in metrics:
            results["fid"] = fid(real_feats, fake_feats)
        if "kid" in metrics:
            results["kid"] = kid(real_feats, fake_feats, KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED)
            protocol["kid"] = {"subsets": KID_SUBSETS, "subset_size": min(num, KID_SUBSET_SIZE), "seed": KID_SEED}
    if "swd" in metrics:
        results["swd"] = swd(reference.images, fake, SWD_PATCHES, SWD_DIRECTIONS, SWD_SEED)
        protocol["swd"] = {"patches_per_image": SWD_PATCHES, "directions": SWD_DIRECTIONS, "seed": SWD_SEED}
    if "digits" in metrics:
        from dcgan.evaluation.digits_score import DigitsScorer

        if m.channels != 1:
            raise ConfigError("--metrics digits needs a 1-channel generator")
        score = DigitsScorer(m.resolution).score(from_uint8(fake))
        results.update({f"digits_{k}": v for k, v in score.as_dict().items()})
    expected = metric_keys([metric for metric in EVAL_METRICS if metric in metrics])
    assert tuple(results) == expected, f"evaluate returned {tuple(results)}, config.metric_keys promises {expected}"
    return Evaluation(results, protocol)


# --- evaluation during training ------------------------------------------------------------------

EMA_PREFIX = "ema_"
"""Eval results of the averaged G are logged beside the raw G's under this prefix (eval/ema_swd)."""


def best_key(config: Config) -> str:
    """The eval result that eval.best ranks checkpoints by: of the G that images come from."""
    return (EMA_PREFIX if config.images_from_average else "") + config.eval.best


def evaluate_during_training(
    raw: LoadedGenerator, average: LoadedGenerator | None, config: Config, info: DistInfo
) -> dict[str, float]:
    """eval.metrics of the trained G and, when kept, of its average (keys prefixed EMA_PREFIX), on
    eval.data (default: the training data); collective."""
    generators = {"": raw} if average is None else {"": raw, EMA_PREFIX: average}
    data = config.eval.data or config.data.shards or "digits"
    results: dict[str, float] = {}
    for prefix, loaded in generators.items():
        evaluation = evaluate(loaded, data, config.eval.num, list(config.eval.metrics), info, config.eval.inception)
        results.update({prefix + key: value for key, value in evaluation.results.items()})
    return results
