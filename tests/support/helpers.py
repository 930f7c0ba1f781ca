"""What the test modules share besides fixtures (those are in conftest.py) and multi-process runs (those
are in distributed_helpers.py): the tiny config, the command line run as a user runs it (a process of
its own) or in this process, the one environment every subprocess gets, the single CPU rank, image
files whose pixels spell their index, and a run directory's checkpoints and stats read back."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dcgan.config import Config, load_config
from dcgan.distributed.env import DistInfo
from dcgan.run.checkpoint import checkpoint_dir, is_complete, list_checkpoints
from dcgan.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

DIGITS_MODEL = ("model.resolution=32", "model.ngf=32", "model.ndf=32", "model.nz=64", "train.batch_size=64")
"""The 32x32 digits model of the quality tests (conftest's trained_digits_run)."""

CPU = DistInfo.single()
"""One process on the CPU, with no process group."""

BEYOND_THE_PAPER = (
    "optim.lr_g=1e-4",
    "optim.lr_d=4e-4",
    "optim.beta1_d=0",
    "optim.beta2_d=0.9",
    "loss.kind=hinge",
    "model.spectral_norm=both",
    "loss.augment=color,translation,cutout",
    "loss.r1=1",
    "loss.r1_every=4",
)
"""Every option beyond the paper's recipe at once (TTUR with D's own betas, the hinge loss, spectral
normalization of G and D, DiffAugment of all three policies): the exact-resume and world-size tests run
with it as with the defaults."""


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    """The tiny test model (16x16, widths 8) on the built-in digits, writing into run_dir."""
    return load_config(TINY, [f"run.dir={run_dir}", *overrides])


# --- the command line -------------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts: this checkout first on the path, one OpenMP
    thread a process (several ranks share 2 cores), wandb quiet; `extra` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


def run_cli(
    *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m dcgan ...` as a user would, from the repository root, in a process of its own: for
    what needs one (a run that receives signals or holds a lock against another, data workers or
    wandb's service writing to the process's stderr, the environment at start-up, a separate
    interpreter). Other commands: run_in_process."""
    result = subprocess.run(
        [sys.executable, "-m", "dcgan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(**(env or {})),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dcgan {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class TorchrunRun:
    """A finished `torchrun ... -m dcgan train` run: its directory and what the launcher printed."""

    run: Path
    stderr: str


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(*args: str, check: bool = True, program: str = "dcgan") -> CliResult:
    """`dcgan ARGS` (or `dcgan submit ARGS` with program="dcgan submit") through the command's
    own entry point in this process, from the repository root as run_cli: the same parsing, errors, exit
    status and output as the command, without a new interpreter's start-up (seconds each), for commands
    that need no process of their own.

    As in a fresh interpreter, logging has no handlers of its own: warnings and errors reach stderr as
    bare messages (Python's last-resort handler), info does not; whatever the command sets up (train's
    log handlers) is removed afterwards. argparse's exits (usage errors, --help) become the status."""
    from dcgan.cli.main import main

    if program == "dcgan submit":
        args = ("submit", *args)
    elif program != "dcgan":
        raise ValueError(f"unknown program {program!r}")
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    last_resort = logging.StreamHandler(err)
    last_resort.setLevel(logging.WARNING)
    root.handlers = [last_resort]
    root.setLevel(logging.WARNING)
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(args))
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
    if check and status != 0:
        raise AssertionError(f"{program} {' '.join(args)} exited {status}\n{out.getvalue()}\n{err.getvalue()}")
    return CliResult(status, out.getvalue(), err.getvalue())


# --- images on disk ---------------------------------------------------------------------------------


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


# --- a run directory read back ----------------------------------------------------------------------


def completed_steps(run: Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    return [step for step, _ in list_checkpoints(RunDir(run).checkpoints)]


def checkpoint_complete(run: Path, step: int) -> bool:
    """Whether the checkpoint of `step` is complete on disk (its .metadata written)."""
    return is_complete(checkpoint_dir(RunDir(run).checkpoints, step))


def read_stats(run: Path) -> list[dict[str, Any]]:
    """stats.jsonl as dicts, one per line; strict (a line that does not parse fails the test), unlike
    dcgan.run.stats.read_stats, which skips a line a running job is writing."""
    return [json.loads(line) for line in RunDir(run).stats.read_text().splitlines()]


def load_checkpoint_tensors(path: Path) -> dict[str, Any]:
    """A complete DCP checkpoint as one flat {key: value} dict, read in this (single) process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return state


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items: dict[str, Any] = {}
        for key, value in tree.items():
            items.update(flatten(value, f"{prefix}{key}."))
        return items
    return {prefix.rstrip("."): tree}


def assert_states_equal(
    a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ("meta.run_id", "meta.config")
) -> None:
    fa, fb = flatten(a), flatten(b)
    assert sorted(k for k in fa if k not in skip) == sorted(k for k in fb if k not in skip)
    for key in fa:
        if key in skip:
            continue
        x, y = fa[key], fb[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{key} differs"
        else:
            assert x == y, f"{key}: {x!r} != {y!r}"


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `address` now ("" for every interface: a port other hosts reach)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])
