"""Real multi-process runs for tests: spawned gloo ranks, `torchrun -m dcgan` as a user runs it, a
training in the background, and signals to a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from helpers import ROOT, free_port, subprocess_env


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    fn(rank, *args)


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run fn(rank, *args) in `world` fresh processes that share a gloo process group via env://."""
    mp.start_processes(_rank_main, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")


def torchrun_cmd(nproc: int, *dcgan_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "dcgan",
        *dcgan_args,
    ]


def torchrun(nproc: int, *dcgan_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N -m dcgan ...`, waited for."""
    return subprocess.run(
        torchrun_cmd(nproc, *dcgan_args),
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_torchrun(nproc: int, *dcgan_args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """`torchrun --nproc_per_node=N -m dcgan ...` in the background, in a session of its own, outside
    pytest's process group (a Ctrl-C of the tests does not reach it: the test ends it with `signal_tree`
    if it is still running); stdout piped, and `stderr` piped too or subprocess.STDOUT for one stream."""
    return subprocess.Popen(
        torchrun_cmd(nproc, *dcgan_args),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def torchrun_until(
    nproc: int, ready: Callable[[], bool], sig: int, *dcgan_args: str, timeout: float = 300
) -> tuple[int, str]:
    """Start torchrun in its own process group, wait until `ready()`, send `sig` to the whole group
    (as a cluster's kill or preemption does), and return (exit status, stderr)."""
    proc = start_torchrun(nproc, *dcgan_args)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it was interrupted:\n{proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("run never became ready to interrupt")
            time.sleep(0.02)
        signal_tree(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in sessions of their own, so a process
    group signal would miss them; a cluster's job kill reaches every process of the job)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to a process and all its descendants at once (as SLURM does to a job step)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def start_training(run: Path, *overrides: str) -> subprocess.Popen[str]:
    """`dcgan train configs/tiny.yaml` in the background, as a user's second terminal would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "dcgan", "train", "configs/tiny.yaml", f"run.dir={run}", *overrides],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(
            signal.SIGINT, signal.SIG_DFL
        ),  # as in a terminal, even if this runs in the background
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until `condition()`, failing if `process` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early:\n{process.stderr.read() if process.stderr else ''}")
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)
