"""`dcgan submit --sweep`: a grid of overrides submitted as ONE SLURM job array, each point in a run
directory of its own with one wandb group; every point is checked before anything is submitted, and
`--write-points` writes the points for slurm/train.sbatch's array instead.
"""

from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import submitit

from dcgan.cluster.slurm import (
    Resources,
    check_with_slurm,
    checked_config,
    dry_run,
    log_folder,
    make_executor,
    with_range_partitions,
)
from dcgan.cluster.slurm_job import TrainJob
from dcgan.config import Config, ConfigError, load_config
from dcgan.console import table

SweepPoint = dict[str, str]
"""One point of a sweep grid: config key -> value, as written on the command line."""


SWEEP_VALUE = re.compile(r"\s*\[(?P<listed>[^\]]*)\]\s*(?:,|$)|(?P<plain>[^,]+)")
"""One value of `--sweep KEY=V1,V2`: in brackets (commas and all, possibly empty), or up to the next comma."""


def split_choices(values: str) -> list[str]:
    """`1e-4,2e-4` -> two values; a value in brackets is one value, commas and all, so that keys whose
    value is itself a list can be swept: `[],[color,translation]` -> `` (the key's empty setting) and
    `color,translation`."""
    choices = []
    for found in SWEEP_VALUE.finditer(values):
        if found["listed"] is not None:
            choices.append(found["listed"].strip())
        elif found["plain"].strip():
            choices.append(found["plain"].strip())
    return choices


def parse_sweep(specs: list[str]) -> list[SweepPoint]:
    """`["optim.lr=1e-4,2e-4", "seed=0,1,2"]` -> the 6 points of the grid, the last key varying fastest."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        choices = split_choices(values)
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
    return table(
        [("point", "job", "run dir"), *((point_name(point), job_id, run_dir) for point, job_id, run_dir in rows)]
    )


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
