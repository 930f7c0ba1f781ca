"""Submit `dcgan train` to SLURM through submitit: one task per GPU, requeued on preemption and timeout.

    python -m launch.slurm configs/celeba64.yaml data.shards=shards/celeba64 --nodes 2 --gpus-per-node 8 --time 1440
    python -m launch.slurm configs/digits.yaml --tasks-per-node 2 --cpus-per-task 1   # a CPU cluster
    python -m launch.slurm configs/celeba64.yaml train.global_batch=1536 --nodes 2-4 --gpus-per-node 8  # any 2 to 4 nodes
    python -m launch.slurm configs/tiny.yaml --local            # submitit's local executor, no SLURM
    python -m launch.slurm configs/digits.yaml --sweep optim.lr=1e-4,2e-4 seed=0,1,2   # one job array

srun starts one process per task (no torchrun inside); each exports the torch.distributed environment
from SLURM's variables and runs the same training code as torchrun does. When the time limit nears,
SLURM sends the tasks USR2 (and at preemption where the cluster sets PreemptParameters=send_user_signal):
the training loop notices at the next step agreement, every rank agrees, a checkpoint is written
collectively, and rank 0 hands over to submitit's own USR2 handler, which requeues the job. The requeued job resumes from that checkpoint (same run directory). SIGTERM alone
(`scancel JOB`) checkpoints and ends the job for good, as submitit itself treats it.

`--nodes MIN-MAX` lets SLURM start (and start again after a requeue) the job on any number of nodes in the
range; each attempt learns its world size from SLURM's variables. With train.global_batch set, every
attempt trains on the same images per step, so a requeue onto fewer nodes continues the same trajectory;
with train.global_batch=0 the global batch is train.batch_size x ranks and changes with the node count.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from dcgan.config import Config, ConfigError, load_config
from dcgan.errors import EXIT_CONFIG

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
        from dcgan.train import train

        env = submitit.helpers.TorchDistributedEnvironment()
        env.master_port = rendezvous_port(
            os.environ.get("SLURM_JOB_ID") or submitit.JobEnvironment().job_id, restart_count()
        )
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


FIRST_PORT, PORTS = 20000, 12000
"""Rendezvous ports lie in 20000-31999, below Linux's ephemeral range (32768-60999), where an outgoing
connection of any process on the node may hold the port a job's store wants to listen on."""


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


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

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(cpus))


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


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    """The fewest nodes the job may run on; the most, too, unless max_nodes is set."""
    max_nodes: int = 0
    """With --nodes MIN-MAX: MAX (SLURM starts each attempt on what it has between the two); 0 = nodes."""
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int = 4
    mem_gb: int | None = None
    partition: str = ""
    time_min: int = 60
    account: str = ""
    qos: str = ""
    constraint: str = ""
    local: bool = False
    signal_delay_s: int = SIGNAL_DELAY_S

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def most_nodes(self) -> int:
        return self.max_nodes or self.nodes

    @property
    def node_spec(self) -> str:
        """SLURM's --nodes value: `N`, or `MIN-MAX` for a range."""
        return str(self.nodes) if self.most_nodes == self.nodes else f"{self.nodes}-{self.most_nodes}"

    def world_sizes(self) -> range:
        """Every world size an attempt of the job may get: tasks per node x each node count of the range."""
        return range(self.nodes * self.tasks, self.most_nodes * self.tasks + 1, self.tasks)


def parse_nodes(text: str) -> tuple[int, int]:
    """`--nodes N` or SLURM's `MIN-MAX` -> (MIN, MAX); MAX is 0 for a plain N. Bad values are refused
    in one line (exit 2) before anything else is checked."""
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high) if sep else 0
    except ValueError:
        raise ConfigError(f"--nodes {text}: write N or MIN-MAX, e.g. 2 or 1-4") from None
    if first < 1 or (sep and last < first):
        raise ConfigError(f"--nodes {text}: needs N >= 1, or 1 <= MIN <= MAX, e.g. 2 or 1-4")
    return first, last


def validate(res: Resources) -> None:
    """Options that cannot work together fail here, with one line, before anything is submitted."""
    if (
        res.nodes < 1
        or res.most_nodes < res.nodes
        or res.gpus_per_node < 0
        or res.cpus_per_task < 1
        or res.time_min < 1
    ):
        raise ConfigError(
            "--nodes (MIN-MAX: 1 <= MIN <= MAX), --cpus-per-task and --time must be >= 1, --gpus-per-node >= 0"
        )
    if res.gpus_per_node and res.tasks_per_node not in (None, res.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {res.tasks_per_node} with --gpus-per-node {res.gpus_per_node}: "
            "training runs one task per GPU; drop --tasks-per-node or make them equal"
        )
    if res.signal_delay_s >= res.time_min * 60:
        raise ConfigError(f"--signal-delay {res.signal_delay_s}s is not shorter than --time {res.time_min} min")
    if res.local and res.most_nodes > 1:
        raise ConfigError("--local runs on this machine only: it cannot use --nodes > 1")
    if res.local and (res.partition or res.account or res.qos or res.constraint):
        raise ConfigError("--local takes no --partition/--account/--qos/--constraint (those are SLURM's)")


def executor_parameters(res: Resources, name: str) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for these resources (SLURM-only keys prefixed slurm_)."""
    params: dict[str, Any] = {
        "name": name,
        "nodes": res.nodes,
        "tasks_per_node": res.tasks,
        "cpus_per_task": res.cpus_per_task,
        "timeout_min": res.time_min,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if not res.local:
        params["slurm_signal_delay_s"] = res.signal_delay_s
        if res.most_nodes != res.nodes:
            params.update(node_range_parameters(res))
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
    return params


def node_range_parameters(res: Resources) -> dict[str, Any]:
    """A --nodes MIN-MAX job, in submitit's terms. submitit types `nodes` as an int (it multiplies it into
    its task count), so the range goes into the script's own line, `nodes` staying MIN for submitit's
    bookkeeping. And sbatch must not see --ntasks-per-node: SLURM then counts MIN x tasks tasks and gives
    the job MIN nodes however many are idle. So sbatch asks one task of all the node's CPUs per node (which
    lets SLURM give as many nodes of the range as it has), and srun splits each node into the tasks."""
    return {
        "slurm_additional_parameters": {"nodes": res.node_spec},
        "tasks_per_node": None,
        "cpus_per_task": res.cpus_per_task * res.tasks,
        "slurm_srun_args": [f"--ntasks-per-node={res.tasks}", f"--cpus-per-task={res.cpus_per_task}"],
    }


def make_executor(res: Resources, folder: Path, name: str, max_requeues: int = 20) -> submitit.AutoExecutor:
    """One folder per job on SLURM (`%j`); the local executor does not expand `%j` everywhere (it left an
    empty directory of that name), so its jobs' files share the folder, prefixed by their job id."""
    cluster = "local" if res.local else "slurm"
    executor = submitit.AutoExecutor(
        folder=str(folder if res.local else folder / "%j"), cluster=cluster, slurm_max_num_timeout=max_requeues
    )
    executor.update_parameters(**executor_parameters(res, name))
    return executor


def check_shards_visible(shards: str) -> None:
    """A data.shards path that does not exist here would fail only once the job leaves the queue.
    URLs and pipes are left to the job; a brace pattern is checked by its directory."""
    if not shards or "://" in shards or shards.startswith("pipe:"):
        return
    path = Path(shards.split("{", 1)[0])
    if not (path if "{" not in shards else path.parent).exists():
        raise ConfigError(
            f"data.shards: {shards} does not exist on this machine (give a path the cluster's nodes share)"
        )


def ask_slurm(res: Resources, folder: Path, name: str) -> tuple[bool, str] | None:
    """(accepted, SLURM's answer) of `sbatch --test-only` on the script submitit would submit; None
    where it cannot be asked (--local, or no sbatch on this machine). Nothing is queued."""
    if res.local or shutil.which("sbatch") is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch") as script:
        script.write(sbatch_text(res, folder, name))
        script.flush()
        result = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True)
    lines = [
        line.removeprefix("sbatch: error: ").removeprefix("sbatch: ") for line in result.stderr.strip().splitlines()
    ]
    return result.returncode == 0, (lines or ["no answer"])[-1]


def check_with_slurm(res: Resources, folder: Path, name: str) -> None:
    """A request the partition can never satisfy (4 CPUs a task on a 2-CPU node, GPUs it does not have)
    is refused here in one line instead of pending forever with reason PartitionConfig."""
    answer = ask_slurm(res, folder, name)
    if answer is not None and not answer[0]:
        raise ConfigError(
            f"SLURM refuses this request ({res.node_spec} node(s) x {res.tasks} task(s) x {res.cpus_per_task} CPU(s), "
            f"{res.gpus_per_node} GPU(s) a node): {answer[1]}"
        )


def with_range_partitions(config: str, overrides: list[str], res: Resources) -> list[str]:
    """The overrides, plus data.partitions where a node range needs it chosen now. Partitions chosen at a
    run's start (ranks x workers of the first attempt) would refuse an attempt requeued onto a node count
    that cannot share them; with train.global_batch set, the run gets the fewest partitions every world
    size of the range can share (their least common multiple), times the workers that still divide the
    global batch. An explicit data.partitions must suit every world size of the range (one line if not)."""
    from dcgan.data.stream import most_partitions, partitions_fit

    run_config = load_config(config, overrides)
    if res.most_nodes == res.nodes or run_config.uses_builtin_digits:
        return overrides
    sizes = list(res.world_sizes())
    if run_config.data.partitions:
        for world_size in sizes:
            if not partitions_fit(run_config.data.partitions, run_config.global_batch(world_size), world_size):
                raise ConfigError(
                    f"--nodes {res.node_spec} x {res.tasks} task(s) may give world size {world_size}, which "
                    f"data.partitions={run_config.data.partitions} does not suit: use a multiple of "
                    f"{math.lcm(*sizes)} that divides the global batch"
                )
        return overrides
    global_batch = run_config.train.global_batch
    if not global_batch or global_batch % math.lcm(*sizes):
        return overrides  # the global batch follows the nodes (warned), or a size is refused by checked_config
    partitions = most_partitions(math.lcm(*sizes), run_config.data.workers, global_batch)
    return [*overrides, f"data.partitions={partitions}"]


def checked_config(config: str, overrides: list[str], res: Resources) -> Config:
    """The run's config, after every check that can be made before anything is queued."""
    validate(res)
    run_config = load_config(config, overrides)
    if res.gpus_per_node == 0 and run_config.train.device == "cuda":
        raise ConfigError("train.device=cuda needs --gpus-per-node >= 1")
    for world_size in res.world_sizes():  # a fixed global batch must split over every node count SLURM may give
        try:
            run_config.batch_per_rank(world_size)
        except ConfigError as exc:
            raise ConfigError(
                f"--nodes {res.node_spec} x {res.tasks} task(s) may give world size {world_size}: {exc}"
            ) from None
    check_shards_visible(run_config.data.shards)
    warn_about_node_range(run_config, res)
    return run_config


def node_range_warning(run_config: Config, res: Resources) -> str | None:
    """With a node range and train.global_batch=0, the global batch is train.batch_size x ranks: an
    attempt requeued onto fewer nodes trains on fewer images a step, with an lr chosen for more, and does
    not continue the same trajectory. Said, not refused: a user may want exactly that."""
    if res.most_nodes == res.nodes or run_config.train.global_batch:
        return None
    low, high = res.world_sizes()[0], res.world_sizes()[-1]
    b = run_config.train.batch_size
    return (
        f"--nodes {res.node_spec} with train.global_batch=0: the global batch will be {b} x ranks, "
        f"{b * low} to {b * high} depending on the nodes SLURM gives each attempt; for the same trajectory on any "
        f"of them set train.global_batch (e.g. train.global_batch={b * high})"
    )


def warn_about_node_range(run_config: Config, res: Resources) -> None:
    """node_range_warning on stderr, where a submitting user sees it beside the job id."""
    if warning := node_range_warning(run_config, res):
        print(f"launch.slurm: warning: {warning}", file=sys.stderr)


def log_folder(folder: Path | None, run_config: Config) -> Path:
    """submitit's logs: `--folder`, else `run.dir/slurm_logs` (beside the run, not in the current directory)."""
    return folder if folder is not None else Path(run_config.run.dir) / "slurm_logs"


def submit(
    config: str, overrides: list[str], res: Resources, folder: Path | None = None
) -> tuple[submitit.Job, Config]:
    """Check the config and resources (with SLURM itself where it is installed), submit; return the job
    and the run's config."""
    overrides = with_range_partitions(config, overrides, res)
    run_config = checked_config(config, overrides, res)
    name = f"dcgan-{Path(run_config.run.dir).name}"
    folder = log_folder(folder, run_config)
    check_with_slurm(res, folder, name)
    return make_executor(res, folder, name).submit(TrainJob(config, list(overrides))), run_config


SweepPoint = dict[str, str]
"""One point of a sweep grid: config key -> value, as written on the command line."""


def parse_sweep(specs: list[str]) -> list[SweepPoint]:
    """`["optim.lr=1e-4,2e-4", "seed=0,1,2"]` -> the 6 points of the grid, the last key varying fastest."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise ConfigError(f"--sweep {spec!r}: write key=value1,value2,... e.g. optim.lr=1e-4,2e-4")
        if any(key == seen for seen, _ in axes):
            raise ConfigError(f"--sweep: {key} is given twice")
        axes.append((key, choices))
    return [dict(zip([k for k, _ in axes], combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def point_name(point: SweepPoint) -> str:
    """A readable directory name for a point: `lr=1e-4_seed=0` (the last part of each key)."""
    return "_".join(f"{key.rsplit('.', 1)[-1]}={value}".replace("/", "-") for key, value in point.items())


def point_extra(config: str, overrides: list[str], point: SweepPoint) -> list[str]:
    """What one point adds to the common overrides: its values, its own run.dir under the sweep's
    run.dir, and one wandb group (the sweep's) with the point's name as the run name."""
    base = load_config(config, overrides)
    sweep_dir = Path(base.run.dir)
    extra = [f"{key}={value}" for key, value in point.items()]
    extra += [f"run.dir={sweep_dir / point_name(point)}", f"log.name={point_name(point)}"]
    if not base.log.group:
        extra.append(f"log.group={sweep_dir.name}")
    return extra


@dataclass(frozen=True)
class CheckedPoint:
    """One point of a sweep: all its overrides, and the config they give (loaded once, so valid)."""

    overrides: list[str]
    config: Config


def point_overrides(config: str, overrides: list[str], point: SweepPoint) -> CheckedPoint:
    """All overrides of one point, checked: every point must be a valid config before anything is submitted."""
    resolved = [*overrides, *point_extra(config, overrides, point)]
    return CheckedPoint(resolved, load_config(config, resolved))


def submit_sweep(
    config: str, overrides: list[str], points: list[SweepPoint], res: Resources, folder: Path | None, parallelism: int
) -> list[tuple[SweepPoint, submitit.Job, str]]:
    """Submit every point as ONE job array (on SLURM; --local runs them as local jobs); return
    (point, job, run dir) per point, in grid order."""
    overrides = with_range_partitions(config, overrides, res)
    run_config = checked_config(config, overrides, res)
    per_point = [point_overrides(config, overrides, point) for point in points]
    name = f"dcgan-{Path(run_config.run.dir).name}"
    folder = log_folder(folder, run_config)
    check_with_slurm(res, folder, name)
    executor = make_executor(res, folder, name)
    if not res.local:
        executor.update_parameters(slurm_array_parallelism=parallelism)
    with executor.batch():
        jobs = [executor.submit(TrainJob(config, checked.overrides)) for checked in per_point]
    return [(point, job, checked.config.run.dir) for point, job, checked in zip(points, jobs, per_point, strict=True)]


def sweep_table(rows: list[tuple[SweepPoint, str, str]]) -> str:
    """point | job id | run dir, one line each (job id '-' in a dry run)."""
    width = max(len(point_name(point)) for point, _, _ in rows)
    lines = [f"{'point':<{width}}  {'job':<14}  run dir"]
    lines += [f"{point_name(point):<{width}}  {job_id:<14}  {run_dir}" for point, job_id, run_dir in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from dcgan.cli import Parser

    parser = Parser(prog="python -m launch.slurm", description=__doc__)
    parser.add_argument("config", help="YAML config, e.g. configs/celeba64.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.dir=runs/x")
    parser.add_argument(
        "--nodes",
        default="1",
        metavar="N|MIN-MAX",
        help="nodes of the allocation, or a range (SLURM's MIN-MAX): each attempt, a requeued one too, runs on the "
        "nodes SLURM gives it; with a range set train.global_batch, else the global batch depends on the node count",
    )
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (0 = CPU job)")
    parser.add_argument(
        "--tasks-per-node", type=int, default=None, help="CPU jobs: processes per node (default: 1, or one per GPU)"
    )
    parser.add_argument(
        "--cpus-per-task",
        type=int,
        default=4,
        help="CPU cores per task (data loader workers live here); on a CPU cluster ask for 1 per process",
    )
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the partition's)")
    parser.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default partition)")
    parser.add_argument(
        "--time", type=int, default=60, help="time limit in minutes (the job requeues itself at the limit)"
    )
    parser.add_argument("--account", default="", help="SLURM account to charge (default: yours)")
    parser.add_argument("--qos", default="", help="SLURM quality of service (default: the account's)")
    parser.add_argument("--constraint", default="", help="SLURM node features, e.g. h100 (default: none)")
    parser.add_argument(
        "--signal-delay",
        type=int,
        default=SIGNAL_DELAY_S,
        help="seconds before the time limit at which the job checkpoints and requeues",
    )
    parser.add_argument("--local", action="store_true", help="run with submitit's local executor instead of SLURM")
    parser.add_argument("--folder", default="", help="submitit's log folder (default: run.dir/slurm_logs)")
    parser.add_argument(
        "--sweep",
        nargs="+",
        metavar="KEY=V1,V2",
        default=None,
        help="submit the grid over these values as ONE job array, each point in run.dir/<point> with one wandb "
        "group, e.g. --sweep optim.lr=1e-4,2e-4 seed=0,1,2",
    )
    parser.add_argument(
        "--write-points",
        metavar="FILE",
        default="",
        help="with --sweep: write each point's overrides as one line of FILE (for POINTS=FILE sbatch --array=... "
        "slurm/train.sbatch) and exit without submitting",
    )
    parser.add_argument(
        "--array-parallelism",
        type=int,
        default=64,
        help="sweep points running at once (SLURM's %%N)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the run's plan (config, world size, data per rank, cadences) and the sbatch script submitit "
        "would submit, then exit without submitting",
    )
    return parser


def sbatch_text(res: Resources, folder: Path, name: str) -> str:
    """The batch script submitit would submit for these resources (nothing is submitted)."""
    executor: Any = make_executor(res, folder, name)._executor  # submitit's SlurmExecutor: its own text, not public API
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def dry_run(config: str, overrides: list[str], res: Resources, folder: Path | None) -> str:
    """What `submit` would do: the same checks, then the plan and the script instead of a job."""
    from dcgan.plan import describe

    overrides = with_range_partitions(config, overrides, res)
    run_config = checked_config(config, overrides, res)
    folder = log_folder(folder, run_config)
    answer = ask_slurm(res, folder, f"dcgan-{Path(run_config.run.dir).name}")
    report = describe(run_config, res.nodes * res.tasks)
    if res.most_nodes != res.nodes:
        sizes = ", ".join(str(w) for w in res.world_sizes())
        report += (
            f"\n--nodes {res.node_spec}: the plan above is for the fewest ({res.nodes} node(s), world size "
            f"{res.nodes * res.tasks}); an attempt may get any of world sizes {sizes}, global batch "
            + (
                f"{run_config.train.global_batch} on each"
                if run_config.train.global_batch
                else ", ".join(str(run_config.global_batch(w)) for w in res.world_sizes())
            )
        )
    if answer is not None:
        report += f"\nSLURM (sbatch --test-only): {'accepts' if answer[0] else 'REFUSES'}: {answer[1]}"
    if res.local:
        return report + "\n--local: submitit's local executor runs the job here, with no sbatch script"
    return report + "\nsbatch script:\n" + sbatch_text(res, folder, f"dcgan-{Path(run_config.run.dir).name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow an option
    try:
        nodes, max_nodes = parse_nodes(args.nodes)
    except ConfigError as exc:
        print(f"launch.slurm: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    res = Resources(
        nodes=nodes,
        max_nodes=max_nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        partition=args.partition,
        time_min=args.time,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        local=args.local,
        signal_delay_s=args.signal_delay,
    )
    folder = Path(args.folder) if args.folder else None
    try:
        if args.sweep:
            return run_sweep(args, res, folder)
        if args.dry_run:
            print(dry_run(args.config, args.overrides, res, folder))
            return 0
        job, run_config = submit(args.config, args.overrides, res, folder)
    except ConfigError as exc:
        print(f"launch.slurm: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"job {job.job_id}\nlogs {job.paths.folder}\nrun {run_config.run.dir}")
    return 0


def run_sweep(args: argparse.Namespace, res: Resources, folder: Path | None) -> int:
    """`--sweep`: print the table of points, job ids and run dirs (a dry run: the plan of the first
    point and the table, nothing submitted)."""
    if args.array_parallelism < 1:
        raise ConfigError("--array-parallelism must be >= 1")
    points = parse_sweep(args.sweep)
    if args.write_points:
        for point in points:
            point_overrides(args.config, args.overrides, point)  # validate every point now
        lines = [" ".join(point_extra(args.config, args.overrides, p)) for p in points]
        Path(args.write_points).write_text("\n".join(lines) + "\n")
        print(
            f"{args.write_points}: {len(points)} point(s); submit with: POINTS={args.write_points} "
            f"sbatch --array=0-{len(points) - 1}%{args.array_parallelism} slurm/train.sbatch {args.config}"
        )
        return 0
    if args.dry_run:
        checked = [point_overrides(args.config, args.overrides, p) for p in points]
        rows = [(p, "-", c.config.run.dir) for p, c in zip(points, checked, strict=True)]
        print(dry_run(args.config, checked[0].overrides, res, folder).split("\nsbatch script:")[0])
        print(f"sweep: {len(points)} point(s) as one job array, at most {args.array_parallelism} at once")
        print(sweep_table(rows))
        return 0
    submitted = submit_sweep(args.config, args.overrides, points, res, folder, args.array_parallelism)
    print(sweep_table([(point, str(job.job_id), run_dir) for point, job, run_dir in submitted]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
