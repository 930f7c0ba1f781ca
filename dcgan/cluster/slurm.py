"""Submit `dcgan train` to SLURM through submitit (`dcgan submit`): one task per GPU, requeued on preemption
and timeout. A node range (`--nodes MIN-MAX`) goes in as slurm/train.sbatch instead, elastic
(dcgan/cluster/elastic_sbatch.py); its checks are the ones here.

srun starts one process per task (no torchrun inside); each exports the torch.distributed environment
from SLURM's variables and runs the same training code as torchrun does. When the time limit nears,
SLURM sends the tasks USR2 (and at preemption where the cluster sets PreemptParameters=send_user_signal):
the training loop notices at the next step agreement, every rank agrees, a checkpoint is written
collectively, and rank 0 hands over to submitit's own USR2 handler, which requeues the job. The requeued job resumes from that checkpoint (same run directory). SIGTERM alone
(`scancel JOB`) checkpoints and ends the job for good, as submitit itself treats it.

`--nodes MIN-MAX` lets SLURM start (and start again after a requeue) the job on any number of nodes in the
range; each attempt learns its world size from SLURM's variables (a sweep with a range still runs here, one
task per GPU, without the elastic rounds of train.sbatch). With train.global_batch set, every
attempt trains on the same images per step, so a requeue onto fewer nodes continues the same trajectory;
with train.global_batch=0 the global batch is train.batch_size x ranks and changes with the node count.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from dcgan.cluster.slurm_job import SIGNAL_DELAY_S, TrainJob
from dcgan.config import Config, ConfigError, load_config


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
    from dcgan.data.partitions import most_partitions, partitions_fit

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
        print(f"dcgan submit: warning: {warning}", file=sys.stderr)


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


def sbatch_text(res: Resources, folder: Path, name: str) -> str:
    """The batch script submitit would submit for these resources (nothing is submitted, and no SLURM is
    needed: a plan is printed on a laptop too)."""
    with srun_check_skipped():
        executor: Any = make_executor(
            res, folder, name
        )._executor  # submitit's SlurmExecutor: its own text, not public API
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


@contextmanager
def srun_check_skipped() -> Iterator[None]:
    """submitit's SLURM executor refuses to be built where `srun` is not on PATH ("Could not detect srun":
    its constructor asks `SlurmExecutor.affinity`), though writing the sbatch script needs no SLURM. Inside
    this block that check answers yes; the executor built here only writes text and never submits."""
    original = submitit.SlurmExecutor.__dict__["affinity"]
    submitit.SlurmExecutor.affinity = classmethod(lambda cls: 1)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        submitit.SlurmExecutor.affinity = original  # type: ignore[method-assign]


def dry_run(config: str, overrides: list[str], res: Resources, folder: Path | None) -> str:
    """What `submit` would do: the same checks, then the plan and the script instead of a job."""
    from dcgan.train.plan import describe

    overrides = with_range_partitions(config, overrides, res)
    run_config = checked_config(config, overrides, res)
    elastic = res.most_nodes != res.nodes and not res.local  # submitted as slurm/train.sbatch
    answer = (
        None if elastic else ask_slurm(res, log_folder(folder, run_config), f"dcgan-{Path(run_config.run.dir).name}")
    )
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
    if elastic:
        return report  # dcgan submit adds the sbatch command and script (elastic_sbatch.dry_run_tail)
    if answer is not None:
        report += f"\nSLURM (sbatch --test-only): {'accepts' if answer[0] else 'REFUSES'}: {answer[1]}"
    folder = log_folder(folder, run_config)
    if res.local:
        return report + "\n--local: submitit's local executor runs the job here, with no sbatch script"
    return report + "\nsbatch script:\n" + sbatch_text(res, folder, f"dcgan-{Path(run_config.run.dir).name}")
