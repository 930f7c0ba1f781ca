"""Errors a user can act on: one line each, with the exit status the CLI returns for them.

Library code raises these (or `config.ConfigError` for a bad setting); `dcgan.cli.main` prints
`dcgan: error: <message>` and exits with `exit_status`, so that a cluster log shows the cause instead
of a traceback. An error raised in a DataLoader worker reaches the training process re-raised with the
worker's traceback folded into its message: `one_line` recovers the original line.
"""

from __future__ import annotations

import os
import signal

# --- exit statuses: every status a dcgan process ends with, in one table ------------------------------
# slurm/train.sbatch (bash) and launch/slurm.py act on these numbers; keep them stable.
EXIT_OK = 0
EXIT_FAILED = 1
"""A one-line runtime error (DcganError) or an unexpected exception."""
EXIT_CONFIG = 2
"""A bad setting, a bad command line, or a checkpoint of another model: nothing was trained."""
EXIT_NONFINITE = 3
"""A non-finite loss stopped the run (train.nonfinite=stop); the last complete checkpoint is kept."""
EXIT_RUN_DIR_IN_USE = 4
EXIT_NO_PROGRESS = 5
EXIT_PEER_LOST = 6
EXIT_PREFLIGHT_BROKEN = 7
"""`dcgan doctor`: a check failed on some rank (its line says which and why): a job would fail there."""
EXIT_PREFLIGHT_FAR_OFF = 8
"""`dcgan doctor`: every check ran, but a rank or a pair of hosts is far slower than the others."""
EXIT_REQUEUE = 75
"""Checkpointed after SIGUSR1/SIGUSR2 (SLURM's warning before the time limit, or preemption): requeue me.
75 is EX_TEMPFAIL."""
EXIT_INTERRUPTED = 130
"""Checkpointed after SIGINT (Ctrl-C): 128 + 2, as a shell reports it."""
EXIT_TERMINATED = 143
"""Checkpointed after SIGTERM alone (scancel): 128 + 15, do not requeue."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
"""The signals a run checkpoints on and then exits with one of the three statuses above
(dcgan.train.preemption); `dcgan compare` passes them on to the run it trains."""


class DcganError(RuntimeError):
    """Base of the project's one-line runtime errors."""

    exit_status = EXIT_FAILED

    def __str__(self) -> str:
        # webdataset appends (stream, url) to the args of an error crossing its pipeline: keep the message
        return str(self.args[0]) if self.args else type(self).__name__


class LaunchError(DcganError):
    """The launch cannot work as started: an incomplete torchrun/srun environment, a GPU that is not
    there, a launcher setting that breaks restarts, a missing optional dependency."""


class IncompatibleCheckpoint(DcganError):
    """The newest checkpoint was written for another model: resuming would train something else.
    Not a damaged checkpoint: `checkpoint.read_newest` lets it through instead of falling back."""

    exit_status = EXIT_CONFIG


class ShardError(DcganError):
    """A shard is missing or unreadable, or its samples cannot be decoded: the message names it."""


class RunDirInUse(DcganError):
    """Another live process holds the run directory; the message names it."""

    exit_status = EXIT_RUN_DIR_IN_USE


class CheckpointWriteError(DcganError):
    """A checkpoint could not be written (full disk, lost mount); the completed ones are untouched.
    `in_collective`: the save failed in an exchange between ranks, which a lost peer also causes: the
    heartbeat's verdict then names the peer instead of this line (dcgan.distributed.session.explain_failure)."""

    def __init__(self, message: str, *, in_collective: bool = False) -> None:
        super().__init__(message)
        self.in_collective = in_collective


class NoProgress(DcganError):
    """Requeued attempts keep resuming from the same step: requeueing again would only burn the budget."""

    exit_status = EXIT_NO_PROGRESS


class PeerLost(DcganError):
    """Another rank or host is gone (killed, down, cut off by the network): the line names it. The
    completed checkpoints are intact and the next start resumes from the newest."""

    exit_status = EXIT_PEER_LOST


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader re-raised it with a worker traceback
    ("Caught ShardError in DataLoader worker process 0. Original Traceback ... ShardError: <line>")."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text.splitlines()[0] if text else type(exc).__name__
    last = text.splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last.split(": ", 1)[-1]


def tell_launcher(exc: BaseException) -> None:
    """Under torchrun, record the error's line in the worker's error file, so that torchrun's failure
    summary names the root cause (instead of `error_file: <N/A>`); nothing elsewhere."""
    # read here, not through dcgan.distributed.env: errors sit below everything, env included
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(type(exc)(one_line(exc)))
    except Exception:  # noqa: BLE001 - the summary is a courtesy: the line was printed already
        pass
