"""Turning SLURM/torchrun stop signals into a checkpoint at the next step boundary.

A signal handler may interrupt a collective half-way, so it only records the signal. The training loop
asks `any_rank(stop.requested)` once per step (a tiny CPU all-reduce on a gloo group): every rank then
agrees on the same step, saves collectively, and exits with EXIT_REQUEUE.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75
"""Exit status after a checkpoint forced by a signal: "stopped early, requeue me" (EX_TEMPFAIL)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignal:
    """Records SIGTERM/SIGUSR1/SIGUSR2 instead of dying, while installed (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
