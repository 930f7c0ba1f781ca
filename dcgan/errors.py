"""Errors a user can act on: one line each, with the exit status the CLI returns for them.

Library code raises these (or `config.ConfigError` for a bad setting); `dcgan.cli.main` prints
`dcgan: error: <message>` and exits with `exit_status`, so that a cluster log shows the cause instead
of a traceback. An error raised in a DataLoader worker reaches the training process re-raised with the
worker's traceback folded into its message: `one_line` recovers the original line.
"""

from __future__ import annotations

import os


class DcganError(RuntimeError):
    """Base of the project's one-line runtime errors."""

    exit_status = 1

    def __str__(self) -> str:
        # webdataset appends (stream, url) to the args of an error crossing its pipeline: keep the message
        return str(self.args[0]) if self.args else type(self).__name__


class LaunchError(DcganError):
    """The launch cannot work as started: an incomplete torchrun/srun environment, a GPU that is not
    there, a launcher setting that breaks restarts, a missing optional dependency."""


class IncompatibleCheckpoint(DcganError):
    """The newest checkpoint was written for another model: resuming would train something else.
    Not a damaged checkpoint: `checkpoint.read_newest` lets it through instead of falling back."""

    exit_status = 2


class ShardError(DcganError):
    """A shard is missing or unreadable, or its samples cannot be decoded: the message names it."""


class RunDirInUse(DcganError):
    """Another live process holds the run directory; the message names it."""

    exit_status = 4


class CheckpointWriteError(DcganError):
    """A checkpoint could not be written (full disk, lost mount); the completed ones are untouched."""


class NoProgress(DcganError):
    """Requeued attempts keep resuming from the same step: requeueing again would only burn the budget."""

    exit_status = 5


class PeerLost(DcganError):
    """Another rank or host is gone (killed, down, cut off by the network): the line names it. The
    completed checkpoints are intact and the next start resumes from the newest."""

    exit_status = 6


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader re-raised it with a worker traceback
    ("Caught ShardError in DataLoader worker process 0. Original Traceback ... ShardError: <line>")."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text.splitlines()[0] if text else type(exc).__name__
    last = text.splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]


def tell_launcher(exc: BaseException) -> None:
    """Under torchrun, record the error's line in the worker's error file, so that torchrun's failure
    summary names the root cause (instead of `error_file: <N/A>`); nothing elsewhere."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(type(exc)(one_line(exc)))
    except Exception:  # noqa: BLE001 - the summary is a courtesy: the line was printed already
        pass
