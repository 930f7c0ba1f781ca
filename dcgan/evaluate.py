"""Scoring generators: FID and KID with a user-supplied Inception network, SWD with none, the digits score.

- FID/KID use the TorchScript Inception of StyleGAN2-ADA and EDM (`inception-2015-12-05.pt`), which
  takes uint8 images (N, 3, H, W) and returns 2048-d pool features with `return_features=True`. It
  cannot be downloaded on every machine, so its path comes from `--inception` or DCGAN_INCEPTION.
- SWD is the sliced Wasserstein distance between 7x7 patches of Laplacian pyramids (Karras et al.
  2018): no pretrained network, so every run can be scored anywhere. Reported x1e3, averaged over levels.
- digits: the digits score of dcgan.quality (Frechet distance at 8x8; lower is better).
Under torchrun each rank generates and featurizes its share of the images; features are gathered.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcgan.config import EVAL_METRICS, ConfigError, metric_keys
from dcgan.distributed import DistInfo
from dcgan.quality import frechet_distance, gaussian_stats
from dcgan.sample import LoadedGenerator, generate

INCEPTION_ENV = "DCGAN_INCEPTION"


def load_inception(path: str, device: torch.device = torch.device("cpu")) -> Callable[[torch.Tensor], torch.Tensor]:
    """The TorchScript feature network on `device`: uint8 (N, 3, H, W) -> float64 features (N, D) on the host."""
    path = path or os.environ.get(INCEPTION_ENV, "")
    if not path:
        raise ConfigError(f"fid/kid need the Inception network: pass --inception PATH or set {INCEPTION_ENV} to inception-2015-12-05.pt")
    if not Path(path).is_file():
        raise ConfigError(f"Inception network not found: {path}")
    with warnings.catch_warnings():  # the published FID network is TorchScript, deprecated or not
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        network = torch.jit.load(path, map_location=device).eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        with torch.no_grad():
            return network(images, return_features=True).double().cpu()

    return features


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(fake), *gaussian_stats(real))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets (as StyleGAN2-ADA)."""
    dim = real.shape[1]
    m = min(len(real), len(fake), subset_size)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / subsets / m)


# ---------------------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian pyramids


def _gaussian_kernel(channels: int) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = torch.outer(k, k) / 256
    return k.expand(channels, 1, 5, 5).contiguous()


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first, ending with the low-pass residual (16x16 or coarser)."""
    kernel = _gaussian_kernel(images.shape[1])
    pyramid = []
    current = images
    for _ in range(levels - 1):
        blurred = F.conv2d(F.pad(current, (2, 2, 2, 2), mode="reflect"), kernel, groups=current.shape[1])
        down = blurred[:, :, ::2, ::2]
        up = F.interpolate(down, scale_factor=2, mode="bilinear", align_corners=False)
        pyramid.append(current - up)
        current = down
    pyramid.append(current)
    return pyramid


def _patches(level: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """`per_image` random 7x7 patches per image, flattened, normalized per channel (mean 0, std 1)."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - 6, (n, per_image), generator=generator)
    xs = torch.randint(0, w - 6, (n, per_image), generator=generator)
    offsets = torch.arange(7)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, 7, 7)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, 7, 7)
    batch = torch.arange(n)[:, None, None, None].expand(n, per_image, 7, 7)
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # (n, per_image, 7, 7, c)
    patches = patches.permute(0, 1, 4, 2, 3).reshape(n * per_image, c, 49)
    mean = patches.mean(dim=(0, 2), keepdim=True)
    std = patches.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return ((patches - mean) / std).reshape(n * per_image, c * 49)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int, generator: torch.Generator) -> float:
    """Mean over random unit directions of the 1-D Wasserstein distance between the projections."""
    dirs = torch.randn(a.shape[1], directions, generator=generator)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return float((pa - pb).abs().mean())


def swd(real: torch.Tensor, fake: torch.Tensor, patches_per_image: int = 64, directions: int = 512, seed: int = 0) -> float:
    """SWD x1e3 averaged over pyramid levels; real and fake are uint8 (N, C, H, W), same N."""
    n = min(len(real), len(fake))
    levels = max(1, int(np.log2(real.shape[-1] // 16)) + 1)
    to_float = lambda x: x[:n].float().div(127.5).sub(1)  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    distances = []
    for level_real, level_fake in zip(laplacian_pyramid(to_float(real), levels), laplacian_pyramid(to_float(fake), levels), strict=True):
        state = generator.get_state()
        pr = _patches(level_real, patches_per_image, generator)
        generator.set_state(state)  # the same patch positions in both sets
        pf = _patches(level_fake, patches_per_image, generator)
        distances.append(sliced_wasserstein(pr, pf, directions, generator))
    return 1e3 * float(np.mean(distances))


# ---------------------------------------------------------------------------------------------------
# Images in, numbers out


def generated_images(loaded: LoadedGenerator, num: int, info: DistInfo, batch: int = 250, seed: int = 12345) -> torch.Tensor:
    """This rank's share (every world-th image) of `num` generated uint8 images; the noise of image i is
    the same whatever the number of ranks, so results do not depend on it."""
    noise = torch.randn(num, loaded.model.nz, generator=torch.Generator().manual_seed(seed))[info.rank :: info.world_size]
    device = next(loaded.generator.parameters()).device
    out = [generate(loaded.generator, noise[i : i + batch].to(device)).float().cpu() for i in range(0, len(noise), batch)]
    return torch.cat(out).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


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


def real_images(data: str, num: int, resolution: int, channels: int) -> torch.Tensor:
    """The first `num` images of a shard directory in stored order, or of the built-in digits."""
    if data == "digits":
        from dcgan.data.digits import digits_images

        images = digits_images(resolution)
    else:
        from dcgan.data.stream import read_images, resolve_shards

        manifest = resolve_shards(data).manifest
        if manifest is not None and (manifest.resolution, manifest.channels) != (resolution, channels):
            raise ConfigError(
                f"--data {data} holds {manifest.resolution}x{manifest.resolution} {manifest.channels}-channel images; "
                f"the generator makes {resolution}x{resolution} {channels}-channel ones"
            )
        images = read_images(data, num, resolution, channels)
    if len(images) < num:
        raise ConfigError(f"--num {num}: the data holds only {len(images)} images")
    return images[:num]


def cache_key(data: str, resolution: int, num: int, extractor: str) -> str:
    """Reference features are cached per data set (its manifest), resolution, count and network."""
    manifest = Path(data) / "manifest.json"
    identity = manifest.read_text() if manifest.is_file() else data
    network = hashlib.sha1(Path(extractor).read_bytes()).hexdigest() if extractor else ""
    blob = json.dumps([identity, resolution, num, network])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def reference_features(data: str, images: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor], cache_dir: Path, key: str, batch: int = 250) -> np.ndarray:
    path = cache_dir / f"ref-{key}.npy"
    if path.is_file():
        return np.load(path)
    feats = torch.cat([features(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    return feats


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCGAN_CACHE", Path.home() / ".cache" / "dcgan"))


def evaluate(loaded: LoadedGenerator, data: str, num: int, metrics: list[str], info: DistInfo, inception: str = "", cache_dir: Path | None = None) -> dict[str, float]:
    """Every requested metric of `loaded` against `num` real images; identical on every rank."""
    cache_dir = cache_dir or default_cache_dir()
    unknown = sorted(set(metrics) - set(EVAL_METRICS))
    if unknown:
        raise ConfigError(f"--metrics: unknown {', '.join(unknown)} (allowed: {', '.join(EVAL_METRICS)})")
    m = loaded.model
    fake = gather_rows(generated_images(loaded, num, info), num, info)
    real = real_images(data, num, m.resolution, m.channels)
    results: dict[str, float] = {}
    if "fid" in metrics or "kid" in metrics:
        extract = load_inception(inception, info.device)
        real_feats = reference_features(data, real, extract, cache_dir, cache_key(data, m.resolution, num, inception or os.environ.get(INCEPTION_ENV, "")))
        mine = fake[info.rank :: info.world_size]
        fake_feats = gather_rows(torch.cat([extract(mine[i : i + 250]) for i in range(0, len(mine), 250)]), num, info).numpy()
        if "fid" in metrics:
            results["fid"] = fid(real_feats, fake_feats)
        if "kid" in metrics:
            results["kid"] = kid(real_feats, fake_feats)
    if "swd" in metrics:
        results["swd"] = swd(real, fake)
    if "digits" in metrics:
        from dcgan.quality import DigitsScorer

        if m.channels != 1:
            raise ConfigError("--metrics digits needs a 1-channel generator")
        score = DigitsScorer(m.resolution).score(fake.float().div(127.5).sub(1))
        results.update({f"digits_{k}": v for k, v in score.as_dict().items()})
    expected = metric_keys([metric for metric in EVAL_METRICS if metric in metrics])
    assert tuple(results) == expected, f"evaluate returned {tuple(results)}, config.metric_keys promises {expected}"
    return results
