"""`dcgan doctor`: its measurement options come from one table, which both adds the flags and builds
DoctorOptions from them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dcgan.cli.common import positive_float, positive_int, ratio_above_one
from dcgan.cluster.doctor_report import DoctorOptions


def doctor_command(args: argparse.Namespace) -> int:
    from dcgan.cluster.doctor import doctor
    from dcgan.config import load_config

    options = DoctorOptions(**{name: getattr(args, name) for name, _, _ in DOCTOR_MEASURES}, json_path=args.json)
    return doctor(load_config(args.config, args.overrides), options)


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


def add_doctor_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan doctor CONFIG`: the preflight of an allocation, launched as training is."""
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
    doc.set_defaults(func=doctor_command)
