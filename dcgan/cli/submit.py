"""`dcgan submit`: training submitted to SLURM through submitit (dcgan.cluster.slurm does the work).

    dcgan submit configs/celeba64.yaml data.shards=shards/celeba64 --nodes 2 --gpus-per-node 8 --time 1440
    dcgan submit configs/digits.yaml --tasks-per-node 2 --cpus-per-task 1   # a CPU cluster
    dcgan submit configs/celeba64.yaml train.global_batch=1536 --nodes 2-4 --gpus-per-node 8  # elastic, 2 to 4 nodes
    dcgan submit configs/tiny.yaml --local            # submitit's local executor, no SLURM
    dcgan submit configs/digits.yaml --sweep optim.lr=1e-4,2e-4 seed=0,1,2   # one job array

`python -m launch.slurm` is the same command under its old name, kept for one release (launch/slurm.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcgan.cli.common import Parser
from dcgan.cluster.elastic_sbatch import dry_run_tail, is_elastic, submit_elastic
from dcgan.cluster.slurm import Resources, dry_run, parse_nodes, submit
from dcgan.cluster.slurm_job import SIGNAL_DELAY_S
from dcgan.cluster.sweep import run_sweep
from dcgan.config import ConfigError
from dcgan.errors import EXIT_CONFIG

PROG = "dcgan submit"
DESCRIPTION = """Submit `dcgan train` to SLURM through submitit: one task per GPU (or --tasks-per-node CPU processes), the
job checkpointing and requeueing itself at its time limit or at preemption. A node range (--nodes MIN-MAX) is submitted
as slurm/train.sbatch instead: torchrun on each node, elastic (a lost node shrinks the job, which resumes from its newest
checkpoint), a failure after torchrun's restarts requeued, never reported as success. --dry-run prints the plan and the
sbatch script without submitting (no SLURM needed)."""


def add_submit_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan submit` among dcgan's commands."""
    parser = commands.add_parser(
        "submit",
        intermixed=True,
        help="submit training to SLURM (submitit; requeued at the time limit)",
        description=DESCRIPTION,
    )
    add_submit_options(parser)
    parser.set_defaults(func=submit_command)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the standalone `python -m launch.slurm` alias: the same options as `dcgan submit`."""
    parser = Parser(prog=PROG, description=DESCRIPTION, intermixed=True)
    add_submit_options(parser)
    return parser


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/celeba64.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.dir=runs/x")
    parser.add_argument(
        "--nodes",
        default="1",
        metavar="N|MIN-MAX",
        help="nodes of the allocation, or a range (SLURM's MIN-MAX): each attempt, a requeued one too, runs on the "
        "nodes SLURM gives it, and a range runs elastic torchrun through slurm/train.sbatch (a lost node shrinks the job "
        "down to MIN); with a range set train.global_batch, else the global batch depends on the node count",
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
    add_sweep_options(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the run's plan (config, world size, data per rank, cadences) and the sbatch script submitit "
        "would submit, then exit without submitting",
    )


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """--sweep and what goes with it: a grid of overrides as one job array."""
    parser.add_argument(
        "--sweep",
        nargs="+",
        metavar="KEY=V1,V2",
        default=None,
        help="submit the grid over these values as ONE job array, each point in run.dir/<point> with one wandb "
        "group, e.g. --sweep optim.lr=1e-4,2e-4 seed=0,1,2; a value in brackets is one value, commas and all: "
        "--sweep 'loss.augment=[],[color,translation,cutout]'",
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


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.slurm ARGV`: `dcgan submit ARGV` under its old name."""
    return submit_command(build_parser().parse_args(argv))


def submit_command(args: argparse.Namespace) -> int:
    """Submit (or plan, or sweep) as `args` ask; a bad setting is one line, `dcgan submit: error: ...`."""
    try:
        return submit_checked(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def submit_checked(args: argparse.Namespace) -> int:
    """submit_command's work; a bad setting raises ConfigError."""
    nodes, max_nodes = parse_nodes(args.nodes)
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
    if args.sweep:
        return run_sweep(args, res, folder)
    if args.dry_run:
        report = dry_run(args.config, args.overrides, res, folder)
        if is_elastic(res):
            report += dry_run_tail(args.config, args.overrides, res, folder)
        print(report)
        return 0
    if is_elastic(res):
        job_id, logs, run_config = submit_elastic(args.config, args.overrides, res, folder)
        print(f"job {job_id}\nlogs {logs}\nrun {run_config.run.dir}")
        return 0
    job, run_config = submit(args.config, args.overrides, res, folder)
    print(f"job {job.job_id}\nlogs {job.paths.folder}\nrun {run_config.run.dir}")
    return 0
