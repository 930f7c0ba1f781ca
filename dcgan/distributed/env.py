"""Who this process is, from what the launcher exported (torchrun, or srun through submitit): rank,
world size, local rank, device, and whether the job spans hosts. The one place that reads RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, SLURM_* and TORCHELASTIC_*; launches that cannot work
(restarts without torchrun's store fix, srun tasks without ranks, a rank without a world) are refused
here, before any work. torch is imported only where a device is made, so that submitting a job on a
login node does not load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dcgan.errors import LaunchError

if TYPE_CHECKING:  # torch itself is imported where a device is made: `dcgan submit` never needs it
    import torch
    import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Who this process is, plus two gloo groups for host-side traffic.

    `flag_group` carries the main thread's host-side collectives: the `any_rank` agreements (stop flag,
    non-finite loss, ...) and evaluation's gathers of features (`dcgan.evaluation.evaluate`); on gloo it is the
    default group itself. `checkpoint_group` is used only by checkpoint saves, which may run in a
    background thread: collectives of two threads must never share a group, or their order differs
    between ranks and they deadlock.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    flag_group: dist.ProcessGroup | None = None
    checkpoint_group: dist.ProcessGroup | None = None
    forced: bool = False
    """A process group of one (dist.force): the multi-rank code path, run by a single process."""

    @staticmethod
    def single(device: torch.device | str = "cpu") -> DistInfo:
        """One process and no process group: benchmarks, planning, tools that read a checkpoint."""
        import torch

        return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group exists and collectives run: several ranks, or one forced."""
        return self.world_size > 1 or self.forced


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def launched_world_size() -> int:
    """The number of ranks the launcher started (torchrun, srun via submitit), known before any rendezvous:
    what a config is checked against before the process group exists."""
    return env_int("WORLD_SIZE", 1)


def pick_device(preference: str, local_rank: int) -> torch.device:
    """CUDA device for this local rank; cuda:0 when CUDA_VISIBLE_DEVICES already narrows us to one GPU."""
    import torch

    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("train.device=cuda, but no CUDA device is visible to this process")
    count = torch.cuda.device_count()
    index = 0 if count == 1 else local_rank
    if index >= count:
        raise LaunchError(f"local rank {local_rank} has no GPU: only {count} visible (check --nproc_per_node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
"""What torchrun needs in its own environment for `--max-restarts` to work: by default (torch >= 2.5)
the agent keeps one store across restarts, and a restarted rank can read the previous round's
addresses and fail to connect ("connectFullMesh ... Connection refused"; pytorch/pytorch#135712).
Measured here: 2 of 2 restarts failed without it, 4 of 4 resumed with it."""


def check_elastic_restarts() -> None:
    """Refuse, before any work, restarts that torchrun would start but not reconnect: one line naming
    the fix beats a first restart that fails after hours of training."""
    restarts = env_int("TORCHELASTIC_MAX_RESTARTS", 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise LaunchError(
            f"torchrun --max-restarts={restarts} needs {SHARED_STORE_FIX} in torchrun's environment "
            f"(restarted ranks otherwise read stale addresses from torch's shared store): {SHARED_STORE_FIX} torchrun ..."
        )


def check_srun_tasks() -> None:
    """Refuse tasks that srun started without telling them their rank: each would run alone (N separate
    runs racing for run.dir, or N one-rank doctors each saying "ok")."""
    tasks = env_int("SLURM_STEP_NUM_TASKS", 1)
    if tasks > 1 and not os.environ.get("WORLD_SIZE"):
        raise LaunchError(
            f"srun started {tasks} tasks, but none knows its rank (WORLD_SIZE is not set), so each would run "
            "alone: start one torchrun per node (srun --ntasks-per-node=1 torchrun --nnodes=... -m dcgan ...), "
            "as slurm/train.sbatch does, or submit training with dcgan submit"
        )


def spans_hosts() -> bool:
    """Whether the job's ranks live on more than one host, from what the launchers export: torchrun's
    LOCAL_WORLD_SIZE (ranks on this host) where set, else the nodes of this SLURM job step."""
    local = env_int("LOCAL_WORLD_SIZE", 0)
    if local:
        return local < launched_world_size()
    return env_int("SLURM_STEP_NUM_NODES", env_int("SLURM_JOB_NUM_NODES", 1)) > 1


def launched_rank() -> int:
    """This process's global rank as the launcher numbered it (0 for a process started alone)."""
    return env_int("RANK", 0)


def check_rank_has_world() -> None:
    """Refuse a RANK without a WORLD_SIZE: a launcher that numbered this process but said nothing of
    the others (each process would otherwise run alone)."""
    if os.environ.get("RANK") and not os.environ.get("WORLD_SIZE"):
        raise LaunchError(
            f"RANK={os.environ['RANK']} is set but WORLD_SIZE is not: start the ranks with torchrun or srun"
        )


def launched_local_rank() -> int:
    """This process's rank among those on its host (which GPU it takes)."""
    return env_int("LOCAL_RANK", 0)


def launched_local_world_size() -> int:
    """How many ranks share this host (torchrun's and submitit's LOCAL_WORLD_SIZE); 1 where no launcher
    says, which makes every rank a host of its own (the heartbeat then beats per rank: safe, dearer)."""
    return max(env_int("LOCAL_WORLD_SIZE", 1), 1)


def torchrun_round() -> int:
    """torchrun's restart count: 0 in the first round of workers, one more at every restart."""
    return env_int("TORCHELASTIC_RESTART_COUNT", 0)


def under_torchrun() -> bool:
    """Whether torchrun's agent started this process (and waits for it as its parent)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def slurm_job() -> str | None:
    """The SLURM job this process runs in, as squeue names it (ARRAY_TASK for an array task), or None."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_job_id() -> str | None:
    """SLURM's own number of this job (an array task's own id, not the array's), or None."""
    return os.environ.get("SLURM_JOB_ID")


def slurm_restart_count() -> int:
    """How many times SLURM requeued this job: 0 in its first attempt and outside SLURM."""
    return env_int("SLURM_RESTART_COUNT", 0)


def slurm_cpus_per_task() -> int | None:
    """The CPUs SLURM gave each task (--cpus-per-task), or None outside SLURM or where it was not asked."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus else None
