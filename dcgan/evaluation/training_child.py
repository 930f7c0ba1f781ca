"""A comparison's `dcgan train` run in a child process that stops when the comparison does.

Killing `dcgan compare` used to leave its run training on, orphaned, writing into a directory nobody would
score. Here the run gets every stop signal the comparison receives (and checkpoints, as `dcgan train` does),
and on Linux the kernel stops it when the comparison dies of a signal nothing can pass on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType

from dcgan.errors import STOP_SIGNALS

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal the kernel sends a process when the thread that started it ends."""


def stopped_with_parent() -> Callable[[], None] | None:
    """A preexec_fn, on Linux, that has the kernel send the child SIGTERM when this process dies of a
    signal nothing can forward (SIGKILL, the OOM killer): the run then checkpoints and ends instead of
    training on with no comparison to score it. prctl is looked up here, in the parent: between fork and
    exec the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def run_training_child(command: list[str]) -> tuple[int, str, list[int]]:
    """Run a `dcgan train` child to its end: (its exit status, its stderr, the stop signals this process
    received meanwhile). The child has a session of its own, so that a terminal's Ctrl-C reaches it once,
    through this process, which passes on every stop signal it receives: the child checkpoints at its next
    step and exits (a second Ctrl-C stops it at once, as `dcgan train` promises). An ignored SIGINT (a
    background job) stays ignored."""
    received: list[int] = []
    with subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=stopped_with_parent(),
    ) as child:

        def forward(signum: int, frame: FrameType | None) -> None:
            if not received:
                print(
                    f"dcgan compare: {signal.Signals(signum).name}: the run checkpoints, then the comparison stops",
                    file=sys.stderr,
                    flush=True,
                )
            received.append(signum)
            child.send_signal(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) != signal.SIG_IGN:
                    previous[signum] = signal.signal(signum, forward)
        try:
            _, stderr = child.communicate()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return child.returncode, stderr, received
