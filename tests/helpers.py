"""What many test modules need: the single CPU rank, and a run directory's checkpoints and stats read
back the way the assertions want them."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dcgan.checkpoint import checkpoint_dir, is_complete, list_checkpoints
from dcgan.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
"""One process on the CPU, with no process group."""


def completed_steps(run: Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    return [step for step, _ in list_checkpoints(run / "checkpoints")]


def checkpoint_complete(run: Path, step: int) -> bool:
    """Whether the checkpoint of `step` is complete on disk (its .metadata written)."""
    return is_complete(checkpoint_dir(run / "checkpoints", step))


def read_stats(run: Path) -> list[dict[str, Any]]:
    """stats.jsonl as dicts, one per line."""
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(*args: str, check: bool = True) -> CliResult:
    """`dcgan ARGS` through the CLI's own entry point in this process: the same parsing, errors and
    output as the command, without a new interpreter's start-up (seconds each) for commands that need
    no process of their own."""
    from dcgan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    if check and status != 0:
        raise AssertionError(f"dcgan {' '.join(args)} exited {status}\n{out.getvalue()}\n{err.getvalue()}")
    return CliResult(status, out.getvalue(), err.getvalue())
