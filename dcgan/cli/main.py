"""The `dcgan` command line: a thin layer that parses, calls one function, and turns errors into one line.
`DESCRIPTION` is what `dcgan --help` shows a user; `HelpFormatter` gives every option its default.
"""

from __future__ import annotations

import argparse
import sys

from dcgan.cli.bench import add_bench_commands
from dcgan.cli.common import Parser
from dcgan.cli.doctor import add_doctor_command
from dcgan.cli.evaluation import add_compare_command, add_probe_command, add_report_command
from dcgan.cli.generators import add_generator_commands
from dcgan.cli.shards import add_shards_command
from dcgan.cli.submit import add_submit_command
from dcgan.cli.train import add_sync_command, add_train_command
from dcgan.config import ConfigError
from dcgan.errors import EXIT_CONFIG, DcganError, one_line, tell_launcher

DESCRIPTION = """Train DCGANs (Radford et al. 2015) on a laptop CPU or on many GPUs and nodes, and use the result.

  dcgan train CONFIG [key=value ...]        train (torchrun/SLURM: the same command in every process)
  dcgan doctor CONFIG [key=value ...]       preflight of an allocation, launched as training is: one table
  dcgan submit CONFIG [key=value ...]       submit training to SLURM (submitit), --dry-run prints the plan
  dcgan sample SOURCE --num N --out PNG     a grid from a run directory or an exported generator
  dcgan export RUN_DIR --out generator.pt   the newest checkpoint's generator as one file
  dcgan shards KIND SOURCE OUT_DIR          convert images into WebDataset shards
  dcgan bench data DATA                     loader throughput from shards on disk
  dcgan bench step [CONFIG]                 training step vs the pytorch/examples reference step
  dcgan score SOURCE                        digits quality score of a generator
  dcgan eval SOURCE --data DATA             FID / KID / SWD / digits score, table + JSON
  dcgan interpolate SOURCE --out walk.gif  latent-space walks (paper figure 4)
  dcgan arithmetic SOURCE --seed S --a .. --b .. --c ..   a - b + c on averaged latents (paper 6.3)
  dcgan probe RUN_DIR --labels N          linear probe on D's features (paper 5.1)
  dcgan compare CONFIG --a .. --b .. --seeds 3   B vs A over seeds, with 95% intervals
  dcgan sync RUN_DIR                        upload the run's offline wandb segments as one wandb run
  dcgan report RUN_DIR                      one HTML page: curves, eval metrics, sample grids over time

First run (CPU, about 6 minutes on 2 cores): dcgan train configs/digits.yaml run.dir=runs/digits
A run resumes from its newest checkpoint when started again with the same run.dir.
`dcgan COMMAND --help` shows each command's options and their defaults.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dcgan", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_command(commands)
    add_doctor_command(commands)
    add_submit_command(commands)

    add_generator_commands(commands)
    add_probe_command(commands)
    add_compare_command(commands)
    add_sync_command(commands)
    add_report_command(commands)

    add_shards_command(commands)
    add_bench_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"dcgan: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DcganError as exc:
        print(f"dcgan: error: {one_line(exc)}", file=sys.stderr)
        tell_launcher(exc)
        return exc.exit_status
