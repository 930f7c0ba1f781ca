"""Shared fixtures: real image folders and shard directories made on disk, and the runs several modules
read (a trained digits generator, a 2-rank torchrun run), each made once per test session even when
pytest-xdist runs the suite in several worker processes; and how the suite is split between workers.
Plain helpers are in tests/support/helpers.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import DIGITS_MODEL, TorchrunRun, tiny_config, write_image_folder


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """`make(directory)` run once per test session, whichever worker asks first; the others wait for it
    and get the same directory. Under pytest-xdist each worker has a base temporary directory of its own,
    inside one it shares with the others: the directory and its lock live in the shared one. A `make`
    that failed is run again from an empty directory by the next worker that asks (and fails there too,
    with its own error)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if base.name.startswith("popen-gw") else base
    directory, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return made_once(tmp_path_factory, "images", lambda folder: write_image_folder(folder, 80, 16))


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits at 16x16 as block shards (8 shards), for training from shards."""
    from dcgan.data.writer import write_shards

    def make(out: Path) -> None:
        write_shards(
            "digits",
            Path("."),
            out,
            fmt="blocks",
            resolution=16,
            shard_size=225,
            block_size=32,
            workers=1,
            progress=False,
        )

    return made_once(tmp_path_factory, "digit_shards", make)


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32x32 digits generator trained for 300 steps (about 40 s), shared by the quality tests."""
    from dcgan.errors import EXIT_OK
    from dcgan.train.loop import train

    def make(run: Path) -> None:
        config = tiny_config(
            run, *DIGITS_MODEL, "train.steps=300", "log.every=100", "sample.every=300", "checkpoint.every=300"
        )
        assert train(config) == EXIT_OK

    return made_once(tmp_path_factory, "digits_run", make)


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> TorchrunRun:
    """`torchrun --nproc_per_node=2 -m dcgan train configs/tiny.yaml train.steps=10` with an offline wandb
    run, as a user starts it: read by the DDP, tracking and checkpoint tests. Read only: a test that
    changes the run works on a copy."""
    from distributed_helpers import torchrun

    def make(directory: Path) -> None:
        run = directory / "run"
        result = torchrun(2, "train", "configs/tiny.yaml", f"run.dir={run}", "log.wandb=offline", "train.steps=10")
        assert result.returncode == 0, result.stderr
        (directory / "stderr.txt").write_text(result.stderr)

    directory = made_once(tmp_path_factory, "two_rank", make)
    return TorchrunRun(directory / "run", (directory / "stderr.txt").read_text())


SLOW_FIXTURES = {"trained_digits_run", "straight_runs", "cluster", "ema_run", "two_rank_run"}
"""Fixtures that train a model or start a cluster: every test that uses one is slow."""


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in each pytest-xdist worker, as in every process the tests start
    (helpers.subprocess_env): two workers of two threads each on a 2-core machine make OpenMP's threads
    spin against each other's."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def work_unit(nodeid: str) -> str:
    """The tests one pytest-xdist worker runs one after the other: each module's together (its module
    fixtures are made once), and all those on emulated hosts together (fixed host names, one bridge)."""
    path = nodeid.split("::", 1)[0]
    return "emulated hosts" if "/multihost/" in f"/{path}" else path


LONG_FIRST = ("/multihost/", "/test_slurm.py")
"""Work units that take minutes, test after test: handed to the workers first (one each), so that the
rest of the suite fills the other worker around them instead of leaving one worker alone at the end."""

HEAVY_LAST = "/test_scale_hosts.py"
"""32 ranks on 2 cores load the machine 16 times over for minutes: last in their unit, once the other
worker is through test_slurm.py, whose SLURM time slices a start-up that slow would fill."""


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, called only when the suite runs on workers
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole work units to workers, in collection order (pytest-xdist's `xdist_group` marks no longer
    reach its scheduler under pytest 9, so the units are told to it here)."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow` marks every multi-process or long test (module marks, explicit marks, and here: the users
    of SLOW_FIXTURES and every SLURM test), so that `pytest -m "not slow"` is a fast lane; the long work
    units come first, and the heaviest tests last within theirs."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)

    def order(item: pytest.Item) -> tuple[int, bool]:
        path = f"/{item.nodeid}"
        return next((i for i, part in enumerate(LONG_FIRST) if part in path), len(LONG_FIRST)), HEAVY_LAST in path

    items.sort(key=order)
