"""`dcgan submit --nodes MIN-MAX`: the job is slurm/train.sbatch, submitted with sbatch, so that a node range
runs torchrun elastically (--nnodes=MIN:N): a node lost for good shrinks the job instead of ending it, and a
failure left after torchrun's restarts is requeued, never reported as success.

Why not submitit for a range: its job is one task per GPU with no agent that could start a new round on the
nodes left; SLURM's USR2 reaches every process of its step, where submitit's own handler requeues at once;
and its batch script ends with srun, so the job's state is srun's status, with nothing after it to requeue
a failure. train.sbatch already is that agent and that shell, tested on real SLURM: one script, one
behaviour. Fixed node counts (`--nodes N`), `--local` and sweeps stay with submitit.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from dcgan.cluster.slurm import Resources, checked_config, log_folder, with_range_partitions
from dcgan.config import Config, ConfigError, load_config

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
"""The script a range submits, from the checkout this package runs from (it is not in the wheel)."""


def is_elastic(res: Resources) -> bool:
    """Whether `dcgan submit` sends this job as train.sbatch: a node range on SLURM."""
    return res.most_nodes != res.nodes and not res.local


def script_text() -> str:
    if not SCRIPT.is_file():
        raise ConfigError(f"--nodes MIN-MAX submits {SCRIPT}, which is not here: run dcgan from its source checkout")
    return SCRIPT.read_text()


def sbatch_argv(res: Resources, folder: Path, name: str, config: str, overrides: list[str]) -> list[str]:
    """The sbatch command line: the resources as sbatch options (one torchrun task per node, with every
    CPU its processes get), the script's settings as exported variables (MIN_NODES: SLURM does not tell a
    job the MIN of its range), then the config and overrides as the script's arguments. --parsable is in it
    (the job id alone on stdout): the dry run prints exactly the command that submitting runs."""
    exported = f"ALL,MIN_NODES={res.nodes},NPROC_PER_NODE={res.tasks},PYTHON={sys.executable}"
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--nodes={res.node_spec}",
        f"--gres={f'gpu:{res.gpus_per_node}' if res.gpus_per_node else 'none'}",
        f"--cpus-per-task={res.cpus_per_task * res.tasks}",
        f"--time={res.time_min}",
        f"--signal=B:USR1@{res.signal_delay_s}",
        f"--output={folder / '%j.out'}",
        f"--chdir={Path.cwd()}",
        f"--export={exported}",
    ]
    if res.mem_gb:
        argv.append(f"--mem={res.mem_gb}G")
    argv += [
        f"--{key}={getattr(res, key)}" for key in ("partition", "account", "qos", "constraint") if getattr(res, key)
    ]
    return [*argv, str(SCRIPT), config, *overrides]


def ask_slurm(argv: list[str]) -> tuple[bool, str] | None:
    """(accepted, SLURM's answer) of `sbatch --test-only` with this command line; None without sbatch."""
    if shutil.which("sbatch") is None:
        return None
    result = subprocess.run([argv[0], "--test-only", *argv[1:]], capture_output=True, text=True)
    lines = [
        line.removeprefix("sbatch: error: ").removeprefix("sbatch: ") for line in result.stderr.strip().splitlines()
    ]
    return result.returncode == 0, (lines or ["no answer"])[-1]


def prepared(config: str, overrides: list[str], res: Resources, folder: Path | None) -> tuple[Config, list[str]]:
    """Every check `dcgan submit` makes before queueing, then the run's config and the sbatch command."""
    script_text()
    overrides = with_range_partitions(config, overrides, res)
    run_config = checked_config(config, overrides, res)
    name = f"dcgan-{Path(run_config.run.dir).name}"
    return run_config, sbatch_argv(res, log_folder(folder, run_config), name, config, overrides)


def submit_elastic(config: str, overrides: list[str], res: Resources, folder: Path | None) -> tuple[str, Path, Config]:
    """Check, ask SLURM, submit; return the job id, its log file and the run's config."""
    run_config, argv = prepared(config, overrides, res, folder)
    answer = ask_slurm(argv)
    if answer is not None and not answer[0]:
        raise ConfigError(
            f"SLURM refuses this request ({res.node_spec} node(s) x {res.tasks} process(es) x {res.cpus_per_task} "
            f"CPU(s), {res.gpus_per_node} GPU(s) a node): {answer[1]}"
        )
    logs = log_folder(folder, run_config)
    logs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"sbatch failed: {(result.stderr.strip().splitlines() or ['no answer'])[-1]}")
    job = result.stdout.strip().split(";")[0]
    return job, logs / f"{job}.out", run_config


def dry_run_tail(config: str, overrides: list[str], res: Resources, folder: Path | None) -> str:
    """What `--dry-run` adds for a range, after slurm.dry_run's checks and plan: SLURM's verdict, the sbatch
    command and the script it submits."""
    overrides = with_range_partitions(config, overrides, res)
    run_config = load_config(config, overrides)
    name = f"dcgan-{Path(run_config.run.dir).name}"
    argv = sbatch_argv(res, log_folder(folder, run_config), name, config, overrides)
    script = script_text()
    answer = ask_slurm(argv)
    said = f"\nSLURM (sbatch --test-only): {'accepts' if answer[0] else 'REFUSES'}: {answer[1]}" if answer else ""
    return (
        f"{said}\n--nodes {res.node_spec}: submitted as slurm/train.sbatch, torchrun --nnodes={res.nodes}:N "
        f"(N: the nodes each attempt gets)\nsbatch command:\n{shlex.join(argv)}\nsbatch script ({SCRIPT}):\n"
        + script.rstrip("\n")
    )
