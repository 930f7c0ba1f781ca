"""What runs on the nodes of a job `dcgan submit` queued: TrainJob, which submitit pickles, starts
`dcgan train` in each task, checkpoints and requeues at the time limit or at preemption, and moves a
requeued job's rendezvous to a port of its own.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
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
