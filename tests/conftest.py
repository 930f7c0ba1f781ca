"""Shared fixtures: tiny configs, real image folders and shard directories made on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgan.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    """The tiny test model (16x16, widths 8) on the built-in digits, writing into run_dir."""
    return load_config(TINY, [f"run.dir={run_dir}", *overrides])


def run_cli(*args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m dcgan ...` as a user would, from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "dcgan", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dcgan {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def indexed_image(index: int, size: int, channels: int = 3) -> np.ndarray:
    """A (size, size, C) uint8 image whose pixels spell its index (so a test can tell samples apart)."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    image[0, 0, 0], image[0, 1, 0] = index // 256, index % 256
    return image


def image_index(image: np.ndarray) -> int:
    """Inverse of indexed_image for a (C, H, W) array."""
    return int(image[0, 0, 0]) * 256 + int(image[0, 0, 1])


def write_image_folder(folder: Path, count: int, size: int, fmt: str = "PNG") -> list[Path]:
    """Real image files (nested one level, as users' folders often are)."""
    paths = []
    for i in range(count):
        path = folder / f"part{i % 2}" / f"{i:05d}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(indexed_image(i, size)).save(path, format=fmt)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, 80, 16)
    return folder


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits at 16x16 as block shards (8 shards), for training from shards."""
    from dcgan.data.writer import write_shards

    out = tmp_path_factory.mktemp("digit_shards")
    write_shards("digits", Path("."), out, fmt="blocks", resolution=16, shard_size=225, block_size=32, workers=1, progress=False)
    return out


DIGITS_MODEL = ("model.resolution=32", "model.ngf=32", "model.ndf=32", "model.nz=64", "train.batch_size=64")


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32x32 digits generator trained for 300 steps (about 40 s), shared by the quality tests."""
    from dcgan.train import EXIT_OK, train

    run = tmp_path_factory.mktemp("digits_run")
    config = tiny_config(run, *DIGITS_MODEL, "train.steps=300", "log.every=100", "sample.every=300", "checkpoint.every=300")
    assert train(config) == EXIT_OK
    return run


SLOW_FIXTURES = {"trained_digits_run", "straight_runs", "cluster", "ema_run"}
"""Fixtures that train a model or start a cluster: every test that uses one is slow."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow` marks every multi-process or long test (module marks, explicit marks, and here: the users
    of SLOW_FIXTURES and every SLURM test), so that `pytest -m "not slow"` is a fast lane."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
