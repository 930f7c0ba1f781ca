"""Sharded checkpoints through torch.distributed.checkpoint (DCP): every rank writes its share.

Layout: RUN_DIR/checkpoints/step_000001000/ holds DCP's files; the checkpoint is complete only once
DCP's `.metadata` file exists (written last, by the coordinator, after every rank's data is on disk).
Incomplete directories are never loaded and are removed at the next start. Replicated state (DDP
models, optimizers) is deduplicated by DCP, so each rank writes a share and any number of ranks can
load it back; nothing in it is per rank (the data order and the noise are functions of the step).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcgan.config import CheckpointConfig
from dcgan.distributed.env import DistInfo
from dcgan.errors import CheckpointWriteError, IncompatibleCheckpoint, one_line
from dcgan.files import write_text_atomically

log = logging.getLogger(__name__)

T = TypeVar("T")

# DCP warns on every save and load without a process group ("assuming the intent is to save in a single
# process"): that is exactly what one process, `sample`, `export`, `eval` and `score` mean to do.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized", category=UserWarning
)

_STEP_DIR = re.compile(r"^step_(\d{9})$")
METADATA = ".metadata"
BEST = "best.json"


@dataclass(frozen=True)
class Best:
    """Why a checkpoint is the best so far: its value of the eval.best metric (lower is better)."""

    metric: str
    value: float


def read_best(root: Path) -> dict[str, Any] | None:
    """{"step", "metric", "value"} of the best checkpoint so far, if evaluation during training marked one."""
    path = root / BEST
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:09d}"


def is_complete(path: Path) -> bool:
    return (path / METADATA).is_file()


def list_checkpoints(root: Path, *, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints under root, oldest first; only complete ones unless asked."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path) == complete:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    complete = list_checkpoints(root)
    return complete[-1][1] if complete else None


DAMAGED_SUFFIX = ".damaged"
"""A complete checkpoint that cannot be read back is renamed step_N.damaged: kept for inspection, no
longer a resume candidate (the name no longer matches), so a requeued job does not fail on it again."""

UNREADABLE = (Exception, CheckpointException)
"""What reading a damaged checkpoint raises: EOFError/UnpicklingError from a truncated file in one
process, DCP's CheckpointException (a BaseException) collecting every rank's error in a group. A
refused model (errors.IncompatibleCheckpoint) is re-raised before them."""


def read_newest(root: Path, read: Callable[[Path], T], *, set_aside: Callable[[Path], None] | None = None) -> T | None:
    """`read` the newest complete checkpoint that reads back, falling back to older ones with a warning
    naming each damaged one (passed to `set_aside` if given); None when there is no checkpoint. Raises
    the last error when every checkpoint is damaged."""
    candidates = [path for _, path in reversed(list_checkpoints(root))]
    for index, path in enumerate(candidates):
        try:
            return read(path)
        except IncompatibleCheckpoint:
            raise
        except UNREADABLE as exc:
            if index == len(candidates) - 1:
                raise
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            log.warning(
                "checkpoint %s cannot be read (%s: %s): using the previous one, %s",
                path,
                type(exc).__name__,
                reason[:200],
                candidates[index + 1].name,
            )
            if set_aside is not None:
                set_aside(path)
    return None


def stored_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
    """Flattened keys ('progress.step', ...) of a complete checkpoint, each with its tensor's shape
    (None for non-tensor values), from one read of its metadata."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key: tuple(meta.size) if hasattr(meta, "size") else None for key, meta in stored.items()}


def load_in_process(path: Path, state: dict[str, Any]) -> None:
    """Fill `state` in place from the checkpoint at `path` in this process alone (no process group): how
    `sample`, `export`, `eval` and `probe` read a run."""
    dcp.load(state, checkpoint_id=str(path), no_dist=True)


FULL_BELOW_BYTES = 1 << 20
"""Free space under which a failed save is put down to a full disk."""


def disk_full(exc: BaseException, root: Path) -> bool:
    """Whether a failed save ran out of space: by its error, or, where torch's zip writer hides ENOSPC
    behind "unexpected pos" (the file is short of what it wrote), by the space left where it wrote."""
    if "No space left on device" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(root).free < FULL_BELOW_BYTES
    except OSError:
        return False


class Checkpointer:
    """Saves (optionally in the background) and loads DCP checkpoints, and prunes old ones.

    At most one save is in flight: starting a new one, loading or closing waits for the previous one.
    """

    def __init__(self, root: Path, config: CheckpointConfig, info: DistInfo) -> None:
        self.root = root
        self.config = config
        self.info = info
        self._pending: Future | None = None
        self._pending_step = -1
        self._pending_best: Best | None = None
        self.saved_step = -1
        """The newest step whose save has started (in flight or complete): never saved twice."""
        self.complete_step = -1
        """The newest step whose checkpoint is complete on disk (its .metadata written)."""
        self.blocked_s = 0.0
        """How long the newest save kept its caller waiting (an async save: until staged), logged when it
        completes: `dcgan train --dry-run` reads it back as the measured cost of a save."""

    def resumed(self, step: int) -> None:
        """The run resumed from the complete checkpoint of `step`."""
        self.saved_step = self.complete_step = step

    def prepare(self) -> None:
        """Before anything is resumed: create the checkpoint directory and remove half-written
        checkpoints (rank 0)."""
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
        self.remove_incomplete()

    def remove_incomplete(self) -> None:
        """Delete half-written checkpoint directories (rank 0, before any save of this run)."""
        if not self.info.is_main:
            return
        for _, path in list_checkpoints(self.root, complete=False):
            log.warning("removing incomplete checkpoint %s (no %s: its save never finished)", path, METADATA)
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def set_aside(self, path: Path) -> None:
        """Rename a damaged checkpoint out of the way (rank 0), keeping its files for inspection."""
        if not self.info.is_main:
            return
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        suffix = 1
        while target.exists():
            target, suffix = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{suffix}"), suffix + 1
        path.rename(target)
        log.warning("damaged checkpoint kept as %s", target)

    def save(self, step: int, state: dict[str, Any], *, blocking: bool = False, best: Best | None = None) -> None:
        """Write `state` as the checkpoint of `step`, in the background unless blocking or configured off.
        With `best`, this checkpoint becomes the best one (best.json, kept by prune), once it is complete."""
        started = time.monotonic()
        self.wait()
        self.saved_step = step
        self._pending_best = best
        path = checkpoint_dir(self.root, step)
        if self.info.is_main:
            path.mkdir(parents=True, exist_ok=True)
        group = self.info.checkpoint_group if self.info.distributed else None
        if self.info.distributed:  # the directory exists before any rank writes into it
            dist.barrier(group=group)  # the save's own group, not the main thread's (wait_for_every_rank)
        if self.config.async_save and not blocking:
            pending = dcp.async_save(
                state, checkpoint_id=str(path), process_group=group, no_dist=not self.info.distributed
            )
            assert isinstance(pending, Future), "without an async stager DCP returns a Future"
            self._pending = pending
            self._pending_step = step
            self.blocked_s = time.monotonic() - started
        else:
            try:
                dcp.save(state, checkpoint_id=str(path), process_group=group, no_dist=not self.info.distributed)
            except UNREADABLE as exc:
                raise self._write_error(exc, step) from None
            self.blocked_s = time.monotonic() - started
            self._finished(step)

    def poll(self) -> None:
        """Finish the bookkeeping (log, prune) of a background save that has completed; never blocks."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except UNREADABLE as exc:
                raise self._write_error(exc, self._pending_step) from None
            self._finished(self._pending_step)

    def _write_error(self, exc: BaseException, step: int) -> CheckpointWriteError:
        """One line for a failed save: a full disk says so, by name; anything else gives its first line.
        The half-written directory has no .metadata: it is never loaded, and removed at the next start."""
        path = checkpoint_dir(self.root, step)
        if is_complete(path):  # every rank's data and the metadata are on disk: only the closing exchange failed
            return CheckpointWriteError(
                f"checkpoint {path} is complete, but a rank failed while the save finished "
                f"({type(exc).__name__}: {one_line(exc)[:300]})",
                in_collective=True,
            )
        if disk_full(exc, self.root):
            reason = f"no space left on device at {path}"
        else:
            reason = f"cannot write checkpoint {path} ({type(exc).__name__}: {one_line(exc)[:300]})"
        previous = latest_checkpoint(self.root)
        kept = f"the last complete one, {previous.name}, is kept" if previous else "no earlier checkpoint exists"
        in_collective = isinstance(exc, RuntimeError) and not isinstance(exc, OSError)  # gloo/NCCL, not the disk
        return CheckpointWriteError(f"{reason}: step {step} was not saved; {kept}", in_collective=in_collective)

    def _finished(self, step: int) -> None:
        """After a save completed: the best marker (only now, so that it never names a half-written
        checkpoint), then pruning (which keeps the best)."""
        self.complete_step = step
        log.info(
            "checkpoint of step %d complete: %s (its save blocked training %.3f s)",
            step,
            checkpoint_dir(self.root, step),
            self.blocked_s,
        )
        if self._pending_best is not None:
            self._write_best(step, self._pending_best)
            self._pending_best = None
        self.prune()

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fill `state` in place from the checkpoint at `path` (every rank reads what it needs)."""
        self.wait()
        group = self.info.checkpoint_group if self.info.distributed else None
        dcp.load(state, checkpoint_id=str(path), process_group=group, no_dist=not self.info.distributed)

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints, every multiple of `keep_every`, and the best."""
        if not self.info.is_main:
            return
        complete = list_checkpoints(self.root)
        best = read_best(self.root)
        for step, path in complete[: max(0, len(complete) - self.config.keep)]:
            if (self.config.keep_every and step % self.config.keep_every == 0) or (best and best["step"] == step):
                continue
            shutil.rmtree(path, ignore_errors=True)

    def _write_best(self, step: int, best: Best) -> None:
        """Record `step` as the best checkpoint (rank 0; kept by prune until replaced)."""
        if self.info.is_main:
            write_text_atomically(
                self.root / BEST, json.dumps({"step": step, "metric": best.metric, "value": best.value})
            )

    def close(self) -> None:
        self.wait()
