"""Turning SLURM/torchrun stop signals into a checkpoint at the next step boundary.

A signal handler may interrupt a collective half-way, so it only records the signal. The training loop
asks `any_rank(stop.requested)` every 10 steps with several ranks (a tiny CPU all-reduce on a gloo
group; one process checks every step): every rank then agrees on the same step, saves collectively,
and exits with a status that says which stop it was.

Which signal asks for a requeue follows SLURM and submitit: the user signal (`--signal`, USR1/USR2) comes
before the time limit, and at preemption where the cluster sets `PreemptParameters=send_user_signal`;
SIGTERM alone is what `scancel` sends, so it checkpoints and stops for good (a cluster that preempts
with PreemptMode=REQUEUE requeues the job itself).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from dcgan.distributed.collectives import any_rank
from dcgan.distributed.env import DistInfo
from dcgan.errors import EXIT_INTERRUPTED, EXIT_REQUEUE, EXIT_TERMINATED, STOP_SIGNALS

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StoppedWhileWaiting(Exception):
    """A stop signal arrived while the single process waited for data (see StopSignal.waiting)."""


class StopSignal:
    """Records SIGTERM/SIGUSR1/SIGUSR2/SIGINT instead of dying, while installed (main thread only).

    Ctrl-C is a graceful stop like the others (checkpoint at the next agreement), but a second Ctrl-C
    stops at once, as a user pressing it twice expects (KeyboardInterrupt; the last complete
    checkpoint stays)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._interrupt_waits = False

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def exit_status(self) -> int:
        """What the process exits with after the checkpoint the signals asked for: a requeue wins over a
        stop (submitit's preemption sends SIGTERM, then USR2)."""
        if any(sig in REQUEUE_SIGNALS for sig in self.received):
            return EXIT_REQUEUE
        return EXIT_INTERRUPTED if signal.SIGINT in self.received else EXIT_TERMINATED

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: checkpointing at the next step boundary, then exiting (Ctrl-C again: stop now)")
        self.received.append(signum)
        if self._interrupt_waits:
            raise StoppedWhileWaiting(signum)

    @contextmanager
    def waiting(self, interruptible: bool) -> Iterator[None]:
        """Around a wait for data: with `interruptible` (one process, nothing to agree on with other
        ranks), a stop signal raises StoppedWhileWaiting instead of waiting for a batch that may never
        come (a hung mount). With several ranks the others would be inside the step's collectives, so
        the signal is honoured at the next agreement as usual."""
        if interruptible and self.requested:
            raise StoppedWhileWaiting(self.received[-1])
        self._interrupt_waits = interruptible
        try:
            yield
        finally:
            self._interrupt_waits = False

    def install(self) -> StopSignal:
        """Take over the stop signals. An ignored SIGINT stays ignored: a shell starts background jobs
        that way so that Ctrl-C at the terminal does not reach them."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


STOP_CHECK_EVERY = 10
"""With several ranks, steps between agreements on a stop signal (a host-side collective each time)."""


def stop_agreed(stop: StopSignal, step: int, info: DistInfo) -> bool:
    """Whether every rank stops after this step. One process checks its flag at every step; ranks agree
    every STOP_CHECK_EVERY steps (the same steps everywhere), so that a launch-bound step does not wait
    on a cross-node round trip each time: SLURM's 120 s warning leaves room for ten more steps."""
    if not info.distributed:
        return stop.requested
    return step % STOP_CHECK_EVERY == 0 and any_rank(stop.requested, info)
