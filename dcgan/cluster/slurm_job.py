"""What runs on the nodes of a SLURM job: TrainJob, which submitit pickles (`dcgan submit`), starts
`dcgan train` in each task, checkpoints and requeues at the time limit or at preemption, and moves a
requeued job's rendezvous to a port of its own; `python -m dcgan.cluster.slurm_job TORCHRUN_ARGS` is
slurm/train.sbatch's torchrun on each node, with an exit status the script can act on.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from dcgan.config import load_config
from dcgan.distributed.env import slurm_cpus_per_task, slurm_job_id, slurm_restart_count

log = logging.getLogger(__name__)


SIGNAL_DELAY_S = 120
"""Seconds before the time limit at which SLURM sends USR2: enough to finish a step and a checkpoint."""


@dataclass
class TrainJob(submitit.helpers.Checkpointable):
    """The picklable job: a config path plus overrides. Resuming needs no state of its own, because the
    run directory holds the checkpoints; `checkpoint()` resubmits the same job."""

    config: str
    overrides: list[str] = field(default_factory=list)

    def __call__(self) -> int:
        from dcgan.errors import EXIT_REQUEUE, EXIT_TERMINATED
        from dcgan.train.loop import train

        env = submitit.helpers.TorchDistributedEnvironment()
        env.master_port = rendezvous_port(slurm_job_id() or submitit.JobEnvironment().job_id, slurm_restart_count())
        env.export(set_cuda_visible_devices=False)
        limit_threads_to_allocation()
        status = train(load_config(self.config, self.overrides))
        if status == EXIT_REQUEUE:
            hand_over_to_submitit(env.rank)
        if status == EXIT_TERMINATED:
            wait_for_slurm_after_sigterm()
            return status
        if status not in (0, EXIT_REQUEUE):
            raise RuntimeError(f"training exited with status {status}")
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, list(self.overrides)))


def rendezvous_port(job_id: str, restart: int) -> int:
    """One port per job and per requeue (32 requeues before a job meets another's ports; submitit allows
    20), the rule slurm/train.sbatch spells in shell: every task computes it alone and agrees. SLURM_JOB_ID
    is unique per array task too (submitit's job id is ARRAY_TASK there). submitit's own choice depends on
    the job id only, so a requeued job met the port its previous attempt's rank 0 was still releasing
    (EADDRINUSE in CI)."""
    job_number = int(re.sub(r"\D", "", job_id) or 0)
    return FIRST_PORT + (job_number * 32 + restart) % PORTS


def limit_threads_to_allocation() -> None:
    """One intra-op thread per CPU SLURM gave this task: torch's default (every core of the node) makes
    tasks that share a node fight over cores (a 2-task job ran at 22-66 img/s beside an sbatch job at
    650-1560 img/s on one 2-core node). A user's OMP_NUM_THREADS wins."""
    import torch

    cpus = slurm_cpus_per_task()
    if cpus and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpus)


REQUEUE_WAIT_S = 300
"""How long a task waits, after a forced checkpoint, for SLURM to end it: ranks other than 0 for the
requeue that rank 0's handler asks for, every rank after SIGTERM for the cancel's kill (KillWait, 30 s
by default) or a preemption's USR2. SLURM stops every task of the job at once, so the wait never runs out
in a healthy cluster."""


def wait_for_slurm_after_sigterm() -> None:
    """After the checkpoint that SIGTERM alone asked for, do what submitit's own handler does with
    SIGTERM: keep the task alive. A `scancel` then ends it (SLURM's KillWait later) and nothing is
    requeued; a preemption's USR2, which may follow the SIGTERM by a moment, reaches submitit's handler
    (ours is uninstalled by now) and requeues the job, which resumes from that checkpoint."""
    log.warning(
        "stopped by SIGTERM after its checkpoint: not requeueing unless USR2 follows (preemption); scancel ends the job"
    )
    time.sleep(REQUEUE_WAIT_S)


def hand_over_to_submitit(rank: int) -> None:
    """After the forced checkpoint: rank 0 runs submitit's USR2 handler (requeue, then exit); the other
    ranks wait to be stopped by the requeue rather than report a finished task, which would make
    submitit record the job as done."""
    if rank == 0:
        signal.raise_signal(signal.SIGUSR2)
    time.sleep(REQUEUE_WAIT_S)


FIRST_PORT, PORTS = 20000, 12000
"""Rendezvous ports lie in 20000-31999, below Linux's ephemeral range (32768-60999), where an outgoing
connection of any process on the node may hold the port a job's store wants to listen on."""


# --- slurm/train.sbatch's launcher: one torchrun agent per node, its status told truly -----------------

NO_REQUEUE_STATUSES = {
    0: "finished",
    2: "a setting",
    4: "run.dir in use",
    5: "no progress",
    130: "SIGINT",
    143: "SIGTERM",
}
"""Statuses after which slurm/train.sbatch does not requeue: done, a failure that every attempt would
repeat, or a stop asked for. Any other failure (restarts exhausted) is requeued."""

AGENT = "--agent"
"""First argument of the child process that runs torchrun's agent (the launcher itself is its parent)."""


def launch(argv: list[str]) -> int:
    """What srun runs on each node: torchrun's agent in a child process, so that this process outlives
    it however it ends (an exception, a signal, or SIGKILL from dcgan.distributed.reaper when it is stuck
    on a rendezvous that is gone). Then, whatever happened: its status goes to the job's shared directory
    for the batch script (srun reports only the highest status of its tasks, or 128+9 for the peers it
    killed, which hid a refused start on one node), and a node other than the first, whose agent failed,
    checks whether the first node (batch script, rendezvous) is lost."""
    status = 1
    try:
        status = agent_status(argv)
    except OSError as exc:
        log.error("the launcher could not run torchrun's agent: %s", one_line(exc))
    finally:
        record_status(status)
        if status not in NO_REQUEUE_STATUSES and os.environ.get("SLURM_NODEID", "0") != "0":
            requeue_if_first_node_lost(rendezvous_host(argv))
    return status


def agent_status(argv: list[str]) -> int:
    """Run the agent's child and return its status (128 + the signal that killed it). slurmstepd signals
    every process of the step (its proctrack plugins all do), the agent too, so this process only keeps
    living through a SIGTERM or SIGINT; it forwards nothing, which would signal the agent twice."""
    import subprocess
    import sys

    signums = (signal.SIGTERM, signal.SIGINT)
    # a Python handler, not SIG_IGN, which the child would inherit
    before = [signal.signal(signum, lambda *_: None) for signum in signums]
    try:
        code = subprocess.Popen([sys.executable, "-m", "dcgan.cluster.slurm_job", AGENT, *argv]).wait()
    finally:
        for signum, handler in zip(signums, before, strict=True):
            signal.signal(signum, handler)
    return code if code >= 0 else 128 - code


def run_torchrun(argv: list[str]) -> int:
    """torchrun's agent in this process, with an exit status that says what happened: torchrun itself
    exits 1 for any failed worker, which hid a refused start (5) or a bad setting (2) from the batch
    script, so a requeue could repeat them forever. Here the status is the first failed worker's, or
    128 + the signal that stopped the agent, or 1 for anything else the agent raised (a rendezvous or
    network error when the first node is lost), logged in one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from dcgan.distributed.reaper import AGENT_PID_VARIABLE

    os.environ[AGENT_PID_VARIABLE] = str(os.getpid())  # the workers' reaper knows their parent for an agent
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        log.error("%s", exc)  # torchrun's root-cause summary, which its own main prints
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except Exception as exc:  # noqa: BLE001 - whatever ends the agent (rendezvous, network) gets a status
        log.error("torchrun's agent failed: %s", one_line(exc))
        return 1
    return 0


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def rendezvous_host(argv: list[str]) -> str:
    """The host of torchrun's --rdzv-endpoint (HOST:PORT) in `argv`, read without importing torch."""
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name in ("--rdzv-endpoint", "--rdzv_endpoint"):
            endpoint = value if equals else next(iter(argv[i + 1 :]), "")
            return endpoint.rpartition(":")[0] or endpoint
    return ""


def job_state() -> Path | None:
    """The job's directory on shared storage that slurm/train.sbatch makes (DCGAN_JOB_STATE): what every
    node's launcher reported, and the count of failure requeues, across the job's attempts."""
    state = os.environ.get("DCGAN_JOB_STATE")
    return Path(state) if state else None


def record_status(status: int) -> None:
    """This node's status, for the batch script, which reads every node's after srun."""
    state = job_state()
    if state is None:
        return
    try:
        (state / f"status.{os.environ.get('SLURM_NODEID', '0')}").write_text(f"{status}\n")
    except OSError as exc:
        log.error("could not record this node's status %d in %s: %s", status, state, exc)


def failure_requeue_allowed(job: str) -> bool:
    """Whether this node may requeue the job after a failure: the first of the nodes that ask in this
    attempt (a file made exclusively), and while the job's failure requeues stay below REQUEUE_LIMIT; it
    counts this one. The count is the batch script's own (time-limit and preemption requeues are not in it)."""
    limit = int(os.environ.get("REQUEUE_LIMIT", "20"))
    state = job_state()
    if state is None:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) < limit
    try:
        (state / f"head-lost.{os.environ.get('SLURM_RESTART_COUNT', '0')}").open("x").close()
    except FileExistsError:
        return False  # another node requeues this attempt
    except OSError as exc:
        log.error("no job state in %s (%s): requeueing uncounted", state, exc)
        return True
    counter = state / "failure-requeues"
    done = int(counter.read_text().strip() or 0) if counter.is_file() else 0
    if done >= limit:
        log.error("job %s was requeued %d times already after failures (REQUEUE_LIMIT): not requeueing", job, done)
        return False
    counter.write_text(f"{done + 1}\n")
    return True


def requeue_if_first_node_lost(head: str) -> None:
    """The first node holds the batch script and the rendezvous: when it is lost, the survivors' agents
    fail or hang (the reaper ends those), and under `--no-kill` SLURM keeps the job running on them, with
    no batch script to requeue it, until its time limit (seen on the emulated cluster). So the launcher
    of another node, whose agent ended badly, asks the first node's slurmd; where nobody answers there,
    it requeues the job itself, within REQUEUE_LIMIT."""
    import socket
    import subprocess

    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
        port = int(next((line.split("=")[1] for line in config.splitlines() if line.startswith("SlurmdPort")), "6818"))
        socket.create_connection((head, port), timeout=5).close()
        return  # the first node is up: its batch script decides
    except (OSError, ValueError):
        pass  # no slurmd answers there
    job = os.environ.get("SLURM_JOB_ID", "")
    if not failure_requeue_allowed(job):
        return
    log.error("the first node %s (batch script, rendezvous) is lost: requeueing job %s from this node", head, job)
    try:
        subprocess.run(["scontrol", "requeue", job], check=False)
    except OSError as exc:
        log.error("could not requeue job %s: %s", job, exc)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:2] == [AGENT]:
        raise SystemExit(run_torchrun(sys.argv[2:]))
    raise SystemExit(launch(sys.argv[1:]))
