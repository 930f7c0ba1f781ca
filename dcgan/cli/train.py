"""`dcgan train` (and its --dry-run plan) and `dcgan sync` of a run's offline wandb segments."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcgan.config import keys_help


def train_command(args: argparse.Namespace) -> int:
    from dcgan.config import load_config
    from dcgan.distributed.env import launched_rank, launched_world_size
    from dcgan.train.loop import train

    config = load_config(args.config, args.overrides)
    world_size = launched_world_size()
    if args.dry_run:
        from dcgan.train.plan import describe

        if launched_rank() == 0:  # under torchrun, one report
            print(describe(config, world_size))
        return 0
    return train(config)


def sync_command(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from dcgan.train.tracking import sync_command as wandb_sync_command

    command = wandb_sync_command(Path(args.run_dir))
    print(shlex.join(command), flush=True)
    return 0 if args.dry_run else subprocess.run(command).returncode


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan train CONFIG [key=value ...] [--dry-run]`."""
    train = commands.add_parser(
        "train",
        intermixed=True,
        help="train a DCGAN (resumes automatically from the run directory's newest checkpoint)",
        description="Train a DCGAN. Under torchrun or SLURM every process runs this same command.",
        epilog=keys_help(),
    )
    train.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.steps=500 run.dir=runs/x"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, world size, global batch, the data each rank reads, steps per epoch and "
        "the cadences (in wall-clock terms when run.dir has measured step times), and the checkpoint interval that "
        "loses the least work for the job's expected failure rate (docs/performance.md), then exit without training",
    )
    train.set_defaults(func=train_command)


def add_sync_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan sync RUN_DIR [--dry-run]`."""
    sync = commands.add_parser(
        "sync",
        help="upload a run's offline wandb segments (one per start or requeue) as one wandb run",
        description="Runs `wandb sync --id RUN_ID --project P SEGMENT...` over every wandb/offline-run-* of the run "
        "directory; needs `wandb login` (or WANDB_API_KEY) and network.",
    )
    sync.add_argument("run_dir", help="run directory (holds wandb/offline-run-* and config.yaml)")
    sync.add_argument("--dry-run", action="store_true", help="print the wandb command without running it")
    sync.set_defaults(func=sync_command)
