"""The `dcgan` command line: a thin layer that parses, calls one function, and turns errors into one line.
`DESCRIPTION` is what `dcgan --help` shows a user; `HelpFormatter` gives every option its default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcgan.bench_cli import add_bench_commands
from dcgan.config import ConfigError, keys_help
from dcgan.data.cli import add_shards_command
from dcgan.doctor import DoctorOptions
from dcgan.errors import EXIT_CONFIG, DcganError, one_line, tell_launcher
from dcgan.generator_cli import add_generator_commands, positive_int

DESCRIPTION = """Train DCGANs (Radford et al. 2015) on a laptop CPU or on many GPUs and nodes, and use the result.

  dcgan train CONFIG [key=value ...]        train (torchrun/SLURM: the same command in every process)
  dcgan doctor CONFIG [key=value ...]       preflight of an allocation, launched as training is: one table
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option that has a default worth printing, so that `--help`
    alone says what a command will do; descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is False
            or default == ""
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands, too, use HelpFormatter (subparsers take the parent's class).

    `intermixed=True` (for a command that takes key=value overrides) parses as `parse_intermixed_args`
    does, so that overrides may also follow an option: `dcgan train CONFIG --dry-run train.steps=5`.
    A subcommand's parser is called through `parse_known_args`, so that is where intermixing is switched
    on; a request for help is parsed the plain way, which prints each positional's default."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        asks_help = any(word in ("-h", "--help") for word in words[: words.index("--") if "--" in words else None])
        if not self.intermixed or self._intermixing or asks_help:
            return super().parse_known_args(words, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args (Python < 3.12)
        try:
            return self.parse_known_intermixed_args(words, namespace)
        finally:
            self._intermixing = False


def _train(args: argparse.Namespace) -> int:
    import os

    from dcgan.config import load_config
    from dcgan.train import train

    config = load_config(args.config, args.overrides)
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    if args.dry_run:
        from dcgan.plan import describe

        if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
            print(describe(config, world_size))
        return 0
    return train(config)


def _doctor(args: argparse.Namespace) -> int:
    from dcgan.config import load_config
    from dcgan.doctor import doctor

    options = DoctorOptions(**{name: getattr(args, name) for name, _, _ in DOCTOR_MEASURES}, json_path=args.json)
    return doctor(load_config(args.config, args.overrides), options)


def positive_float(text: str) -> float:
    """argparse type for durations and sizes: > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def ratio_above_one(text: str) -> float:
    """argparse type for --outlier: a ratio of 1 or less would flag every rank slower than the others' median."""
    value = float(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"must be > 1, got {text}")
    return value


DOCTOR_MEASURES: tuple[tuple[str, Callable[[str], float], str], ...] = (
    ("seconds", positive_float, "time budget of each measurement (warm-up comes on top)"),
    (
        "outlier",
        ratio_above_one,
        "a rank this many times slower than the other ranks' median (a pair of hosts: than the fastest pair) "
        "is far off",
    ),
    ("write_mib", positive_int, "most MiB each rank writes to time run.dir's file system"),
    ("pair_mib", positive_float, "MiB sent each way between two hosts, per timed exchange"),
)
"""`dcgan doctor`'s options of how long and how hard it measures: (DoctorOptions field, argparse type, help).
Each is the flag of its field's name with dashes, defaulting to the field's default: one table, so that the
command line and DoctorOptions cannot drift apart."""


def add_doctor_measures(doc: argparse.ArgumentParser) -> None:
    """One option per row of DOCTOR_MEASURES."""
    for name, kind, text in DOCTOR_MEASURES:
        doc.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(DoctorOptions, name), help=text)


def _probe(args: argparse.Namespace) -> int:
    import json

    from dcgan.probe import run_probe

    result = run_probe(Path(args.run_dir), args.data, args.labels, args.draws)
    print(result.summary())
    if args.out:
        Path(args.out).write_text(json.dumps(result.__dict__, indent=1))
        print(f"written to {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from dcgan.compare import compare, describe_settings, split_overrides, write_comparison

    a, b = split_overrides(args.a), split_overrides(args.b)
    print(f"A vs B: {describe_settings(args.config, args.overrides, a, b)}", flush=True)
    root = Path(args.out)
    comparison = compare(
        args.config,
        args.overrides,
        a,
        b,
        list(range(args.first_seed, args.first_seed + args.seeds)),
        root,
        args.metric,
        args.num,
    )
    print(comparison.table())
    print(f"written to {write_comparison(comparison, root)}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from dcgan.tracking import sync_command

    command = sync_command(Path(args.run_dir))
    print(shlex.join(command), flush=True)
    return 0 if args.dry_run else subprocess.run(command).returncode


def _report(args: argparse.Namespace) -> int:
    from dcgan.report import write_report

    out = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"{out}: open it in a browser (file://{out.resolve()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dcgan", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

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
        "the cadences (in wall-clock terms when run.dir has measured step times), then exit without training",
    )
    train.set_defaults(func=_train)

    doc = commands.add_parser(
        "doctor",
        intermixed=True,
        help="preflight of an allocation: every rank's host, device, step rate, data and disk; the network; one table",
        description="Run it the way training runs (python -m dcgan doctor CONFIG, torchrun ... -m dcgan doctor CONFIG, "
        "srun + torchrun), with the config and overrides training will use. Every rank reports its host, device, "
        "threads and CPUs; times the configured model's step alone on its device (no collectives, so a slow rank "
        "cannot hide); checks that data.shards is readable (manifest, one image) and times the loader; times "
        "writing and fsyncing a temporary file in run.dir's file system (removed; run.dir is not created). All "
        "ranks then time an all-reduce of G and D's gradient size (bus bandwidth) and of 8 floats (latency), and "
        "one rank per host exchanges --pair-mib with every other host, naming the slowest pair. Rank 0 prints one "
        "table, a rank slower than the other ranks' median by more than --outlier times flagged (a pair of hosts: than the "
        "fastest pair), and a verdict.\n\nExit status: 0 nothing found; 7 a check failed on some rank (its line "
        "says which and why); 8 a rank or a pair of hosts is far off. `dcgan train --help` lists the config keys.",
    )
    doc.add_argument("config", help="YAML config file, e.g. configs/celeba64.yaml")
    doc.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as for dcgan train")
    add_doctor_measures(doc)
    doc.add_argument("--json", default="", help="rank 0 also writes the results as JSON to this file")
    doc.set_defaults(func=_doctor)

    add_generator_commands(commands)

    probe = commands.add_parser(
        "probe",
        help="linear probe on D's features with N labels per class, vs an untrained D (the paper's section 5.1)",
        description="Every hidden layer of D, max-pooled to 4x4 and concatenated, feeds an L2-regularized logistic "
        "regression fitted on --labels images per class and tested on all others; the same probe on D as the run "
        "initialized it is the baseline. Shards written by `dcgan shards digits|mnist` carry labels.",
    )
    probe.add_argument("run_dir", help="run directory (D is read from its newest complete checkpoint)")
    probe.add_argument("--data", default="digits", help="labelled images: 'digits' or a shard directory with labels")
    probe.add_argument("--labels", type=positive_int, default=10, help="labelled training images per class")
    probe.add_argument(
        "--draws", type=positive_int, default=3, help="seeded draws of the labelled images (mean +- std)"
    )
    probe.add_argument("--out", default="", help="also write the accuracies as JSON here")
    probe.set_defaults(func=_probe)

    comp = commands.add_parser(
        "compare",
        intermixed=True,
        help="train two settings over several seeds; mean, spread, 95%% intervals and a paired verdict",
        description="Trains CONFIG with the overrides of --a and of --b at each seed (seed s of both starts from the same "
        "weights, noise and data order), scores each run's generator, and prints per setting the mean, standard "
        "deviation and 95% t-interval, then the paired difference B - A with its interval. Runs live in --out, one "
        "directory per seed and training config: settings that differ only in sample.bn or sample.ema share "
        "training runs, and a rerun resumes or reuses finished runs.",
    )
    comp.add_argument("config", help="YAML config both settings start from")
    comp.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides for both settings, e.g. train.steps=2000"
    )
    comp.add_argument(
        "--a", default="", help="overrides of setting A, space-separated in one argument (empty: the config as is)"
    )
    comp.add_argument(
        "--b",
        required=True,
        help="overrides of setting B, e.g. 'train.ema=0.999'; 'recipe' (for --a or --b) trains the pytorch/examples "
        "recipe instead: its G and D, BCE with Sigmoid, Adam, a permutation of all images per epoch, images with "
        "batch statistics, on the same images, seeds, steps and batch size",
    )
    comp.add_argument("--seeds", type=positive_int, default=3, help="seeds per setting (3 or more give an interval)")
    comp.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    comp.add_argument("--metric", default="", help="result to compare (default: digits_frechet on digits, else swd)")
    comp.add_argument("-n", "--num", type=int, default=0, help="images per evaluation (default: eval.num)")
    comp.add_argument("--out", default="runs/compare", help="directory of the runs and compare.json")
    comp.set_defaults(func=_compare)

    sync = commands.add_parser(
        "sync",
        help="upload a run's offline wandb segments (one per start or requeue) as one wandb run",
        description="Runs `wandb sync --id RUN_ID --project P SEGMENT...` over every wandb/offline-run-* of the run "
        "directory; needs `wandb login` (or WANDB_API_KEY) and network.",
    )
    sync.add_argument("run_dir", help="run directory (holds wandb/offline-run-* and config.yaml)")
    sync.add_argument("--dry-run", action="store_true", help="print the wandb command without running it")
    sync.set_defaults(func=_sync)

    report = commands.add_parser(
        "report",
        help="one HTML page of a run: curves over images seen, eval metrics, sample grids over time",
        description="Reads only RUN_DIR's stats.jsonl, samples/ and config.yaml: works offline and on a run in progress.",
    )
    report.add_argument("run_dir", help="run directory")
    report.add_argument("--out", default="", help="HTML file to write (default: RUN_DIR/report.html)")
    report.set_defaults(func=_report)

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
