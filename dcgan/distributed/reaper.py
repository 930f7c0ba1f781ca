"""Ends torchrun's agent when it is stuck on an unreachable rendezvous after its worker ended.

    python -m dcgan.distributed.reaper AGENT_PID AGENT_START WORKER_PID WORKER_START GRACE_S HOST

Started detached by a worker that found itself cut off from the rendezvous store (dcgan.distributed.liveness), just
before that worker exits. The agent's requests to its store block without a timeout on a dead link
(torch 2.14: `num_nodes_waiting` in the monitor loop, whatever `--rdzv-conf=read_timeout` says), and a
stuck agent never reaps its ended worker: the worker stays a zombie. A working agent reaps it within its
monitor interval (0.1 s by default) and then restarts or exits on its own, and is left alone. So: wait
for the worker to become a zombie (or to be reaped), then give the agent GRACE_S to reap it; an agent
that has not is ended with SIGKILL (it is blocked in C++, where SIGTERM's Python handler never runs).
Processes are named by pid AND start time, so a pid reused meanwhile is never hit. Standard library
only at the top: it must start in a fraction of a second (`end_stuck_agent`, the worker's side that
starts it, imports the rest when called).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

EXIT_WAIT_S = 60.0
"""How long the worker may take to exit before the watch is given up (it is exiting already)."""


def process_state(pid: int, started: str) -> str | None:
    """The state letter of process `pid` (R, S, Z, ...) if it is the one that started at `started`."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0] if fields[19] == started else None


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[19]


def wait_while(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and condition():
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    agent, agent_started, worker, worker_started, grace, host = argv
    agent_pid, worker_pid, grace_s = int(agent), int(worker), float(grace)
    wait_while(lambda: process_state(worker_pid, worker_started) not in (None, "Z"), EXIT_WAIT_S)
    wait_while(lambda: process_state(worker_pid, worker_started) == "Z", grace_s)
    if process_state(worker_pid, worker_started) == "Z" and process_state(agent_pid, agent_started) is not None:
        os.kill(agent_pid, signal.SIGKILL)
        print(
            f"dcgan: torchrun's agent (pid {agent_pid}) on {host} was stuck on the unreachable rendezvous "
            f"{grace_s:g} s after its worker ended: ended it",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


AGENT_GRACE_S = 5.0
"""How long torchrun's agent has to reap its ended worker before it counts as stuck (dcgan.distributed.reaper)."""


AGENT_PID_VARIABLE = "DCGAN_AGENT_PID"
"""Set by an agent that runs torchrun's code under another command line (dcgan.cluster.slurm_job) to its own
pid, which its workers inherit: a pid, not a flag, so that a process further down never takes its parent
for the agent."""


def end_stuck_agent() -> None:
    """Under torchrun, make sure the agent ends too when this host is cut off from the rendezvous: start
    dcgan.distributed.reaper, detached, on the agent (this process's parent) and this worker. The parent
    is an agent when its command line is torchrun's, or when it named itself in AGENT_PID_VARIABLE:
    slurm/train.sbatch's agent runs as `python -m dcgan.cluster.slurm_job`, whose command line names no
    torchrun, and a stuck agent there held the job until its time limit."""
    from dcgan.distributed.env import under_torchrun

    agent = os.getppid()
    if not under_torchrun():
        return
    try:
        if os.environ.get(AGENT_PID_VARIABLE) != str(agent):
            with open(f"/proc/{agent}/cmdline", "rb") as cmdline:
                command = cmdline.read()
            if b"torch.distributed.run" not in command and b"torchrun" not in command:
                return
        started = [start_time(agent), start_time(os.getpid())]
    except OSError:
        return
    subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcgan.distributed.reaper",
            str(agent),
            started[0],
            str(os.getpid()),
            started[1],
            str(AGENT_GRACE_S),
            socket.gethostname(),
        ],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
