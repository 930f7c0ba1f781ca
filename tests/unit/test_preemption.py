"""The stop signals in this process: what each asks for (a graceful stop, a requeue, an immediate
interrupt) and that uninstalling puts back what was there. Real signals to the test process; the
runs that receive them are in test_faults.py and test_checkpoint.py."""

from __future__ import annotations

import os
import signal

import pytest

from dcgan.errors import EXIT_INTERRUPTED, EXIT_REQUEUE, EXIT_TERMINATED
from dcgan.train.preemption import StopSignal


def test_a_second_ctrl_c_interrupts_at_once() -> None:
    """Real SIGINTs to this process: the first asks for a graceful stop, the second raises at once."""
    before = signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # as in a terminal (CI may run us with it ignored)
    stop = StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.exit_status == EXIT_INTERRUPTED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
        restored = signal.signal(signal.SIGINT, before)
    assert restored is signal.default_int_handler  # uninstall put back what was there


@pytest.mark.parametrize(
    ("signals", "status"),
    [
        ([signal.SIGTERM], EXIT_TERMINATED),  # scancel, kill: stop for good
        ([signal.SIGUSR2], EXIT_REQUEUE),  # SLURM's warning before the time limit
        ([signal.SIGTERM, signal.SIGUSR2], EXIT_REQUEUE),  # preemption as submitit simulates it
        ([signal.SIGUSR1, signal.SIGTERM], EXIT_REQUEUE),  # train.sbatch forwards USR1 as SIGTERM
    ],
)
def test_only_the_user_signal_asks_for_a_requeue(signals: list[int], status: int) -> None:
    """Real signals to this process: a `scancel` (SIGTERM alone) must not requeue the job it cancels."""
    stop = StopSignal().install()
    try:
        for sig in signals:
            os.kill(os.getpid(), sig)
        assert stop.received == signals and stop.exit_status == status
    finally:
        stop.uninstall()


def test_an_ignored_sigint_stays_ignored() -> None:
    """A background job started by a shell ignores SIGINT so that Ctrl-C at the terminal spares it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        stop.uninstall()
    finally:
        signal.signal(signal.SIGINT, before)
