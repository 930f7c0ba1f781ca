"""A run directory: its layout (`RunDir`), one job at a time in it, and when to stop requeueing.

Rank 0 holds an exclusive lock on RUN_DIR/.lock for the run.

Two jobs writing one run directory (a double submission, a requeued job racing a manual restart)
interleave the checkpoints of two runs. The lock is an `flock` held by the process itself, so the
kernel releases it whenever that process ends, however it ends (a SIGKILL or a lost node leaves no
stale lock behind, unlike a lock file whose mere existence counts). The file names the holder, so the
refusal can say who it is.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dcgan.config import Config, ConfigError, save_config
from dcgan.distributed.collectives import any_rank
from dcgan.distributed.env import DistInfo, slurm_job, slurm_restart_count
from dcgan.errors import NoProgress, RunDirInUse
from dcgan.files import write_text_atomically

LOCK_NAME = ".lock"
ATTEMPTS = "attempts.json"


@dataclass(frozen=True)
class RunDir:
    """Where a run keeps what: the one place the run directory's layout is spelled out."""

    path: Path

    @property
    def config(self) -> Path:
        """The resolved config of the run (written once its checkpoint, if any, was accepted)."""
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def stats(self) -> Path:
        """One JSON line per metric line and eval (see dcgan.train.tracking)."""
        return self.path / "stats.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step_{step:09d}.png"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def attempts(self) -> Path:
        return self.path / ATTEMPTS

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"

    def finished_message(self, step: int, images_seen: int) -> str:
        """Where a finished run's results are and what to do next, for the end of the log."""
        run = self.path
        return (
            f"finished step {step} ({images_seen} images): samples in {self.samples}, checkpoints in "
            f"{self.checkpoints}, metrics in {self.stats}. Next: `dcgan sample {run} --num 64 --out grid.png`, "
            f"`dcgan eval {run} --data DATA`, `dcgan export {run} --out generator.pt`; to train further, run the same "
            "command with a larger train.steps (it resumes)"
        )

    def require_config(self) -> None:
        """Refuse, in one line, a path that is not a run directory (commands that read a finished run)."""
        if not self.config.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no {self.config.name})")


def holder_description() -> str:
    """Who this process is, in the words a user needs to find it: pid, host, SLURM job, start time."""
    job = slurm_job()
    since = datetime.datetime.now().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f" (SLURM job {job})" if job else "") + f" since {since}"


def create_run_dir(run_dir: Path) -> None:
    """Make the run directory, or say in one line why it cannot be used (a file, no permission)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir: {run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run.dir: cannot create {run_dir} ({exc.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir: {run_dir} is not writable by this user")


class RunDirLock:
    """Exclusive, non-blocking ownership of a run directory for the life of this process (or `release`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).lock
        self._file: IO[str] | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise RunDirInUse naming the holder."""
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirInUse(
                f"run directory {self.path.parent} is in use by {holder}: wait for that job to end, "
                "or use another run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(holder_description() + "\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


MAX_ATTEMPTS_WITHOUT_PROGRESS = 3
"""Requeued starts in a row that resume from the same step before a job stops requeueing itself."""


def count_attempt(run_dir: Path, resumed_step: int) -> int:
    """Record a requeued start at `resumed_step` (rank 0); return how many starts in a row resumed there.

    A start is counted only under SLURM after a requeue (SLURM_RESTART_COUNT > 0): a job whose time
    slice ends before start-up and resume are done never saves a newer checkpoint, and without this
    bound it would requeue itself until the requeue budget or the user's patience runs out."""
    if slurm_restart_count() == 0:
        return 0
    path = RunDir(run_dir).attempts
    try:
        previous = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        previous = {}
    same = previous.get("resumed_step") == resumed_step
    attempts = int(previous.get("attempts", 0)) + 1 if same else 1
    write_text_atomically(path, json.dumps({"resumed_step": resumed_step, "attempts": attempts}))
    return attempts


def refuse_without_progress(run_dir: Path, resumed_step: int, attempts: int) -> None:
    if attempts > MAX_ATTEMPTS_WITHOUT_PROGRESS:
        raise NoProgress(
            f"{attempts - 1} requeued attempts in a row resumed from step {resumed_step} and saved nothing newer "
            "(start-up and resume outlast the job's time slice, or every attempt fails): not training, so that "
            f"the job is not requeued again; give it more time (--time), fix the failure, or delete {RunDir(run_dir).attempts}"
        )


# --- a training run's directory, start to end -------------------------------------------------------


def own_run_dir(run_dir: Path, info: DistInfo) -> RunDirLock | None:
    """Rank 0 creates the run directory and takes its lock; every rank learns whether it did (one line
    each if not)."""
    lock, refusal = None, None
    if info.is_main:
        create_run_dir(run_dir)
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirInUse as exc:
            refusal = exc
    if any_rank(refusal is not None, info):
        raise refusal or RunDirInUse(f"run directory {run_dir} is in use by another job (see rank 0's message)")
    return lock


def check_progress(run_dir: Path, resumed_step: int, final_step: int, info: DistInfo) -> None:
    """Stop a requeued job that keeps resuming from the same step (see count_attempt); all ranks learn
    rank 0's decision."""
    attempts = 0
    if info.is_main and resumed_step < final_step:
        attempts = count_attempt(run_dir, resumed_step)
    if any_rank(attempts > MAX_ATTEMPTS_WITHOUT_PROGRESS, info):
        refuse_without_progress(run_dir, resumed_step, max(attempts, MAX_ATTEMPTS_WITHOUT_PROGRESS + 1))


def save_run_config(config: Config, run_dir: Path, info: DistInfo) -> None:
    """The resolved config, written only after a resume was accepted: a refused checkpoint must leave
    the run directory describing the run it holds."""
    if info.is_main:
        save_config(config, RunDir(run_dir).config)
