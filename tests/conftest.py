"""Shared fixtures: real image folders and shard directories made on disk, and the runs several modules
read (a trained digits generator, a 2-rank torchrun run). Plain helpers are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DIGITS_MODEL, TorchrunRun, tiny_config, write_image_folder


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
    write_shards(
        "digits", Path("."), out, fmt="blocks", resolution=16, shard_size=225, block_size=32, workers=1, progress=False
    )
    return out


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32x32 digits generator trained for 300 steps (about 40 s), shared by the quality tests."""
    from dcgan.errors import EXIT_OK
    from dcgan.train.loop import train

    run = tmp_path_factory.mktemp("digits_run")
    config = tiny_config(
        run, *DIGITS_MODEL, "train.steps=300", "log.every=100", "sample.every=300", "checkpoint.every=300"
    )
    assert train(config) == EXIT_OK
    return run


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> TorchrunRun:
    """`torchrun --nproc_per_node=2 -m dcgan train configs/tiny.yaml train.steps=10` with an offline wandb
    run, as a user starts it: read by the DDP, tracking and checkpoint tests. Read only: a test that
    changes the run works on a copy."""
    from distributed_helpers import torchrun

    run = tmp_path_factory.mktemp("two_rank") / "run"
    result = torchrun(2, "train", "configs/tiny.yaml", f"run.dir={run}", "log.wandb=offline", "train.steps=10")
    assert result.returncode == 0, result.stderr
    return TorchrunRun(run, result.stderr)


SLOW_FIXTURES = {"trained_digits_run", "straight_runs", "cluster", "ema_run", "two_rank_run"}
"""Fixtures that train a model or start a cluster: every test that uses one is slow."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow` marks every multi-process or long test (module marks, explicit marks, and here: the users
    of SLOW_FIXTURES and every SLURM test), so that `pytest -m "not slow"` is a fast lane."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
