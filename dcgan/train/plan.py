"""`--dry-run`: what a run would do, printed before anything trains or is submitted.

A 512-GPU job that reads the wrong shards or checkpoints every 40 minutes instead of every 4 costs a
queue wait to find out. The plan resolves everything that can be known without training: the config,
the world size and global batch, the data each rank will read, steps per epoch, the cadences in steps
and, where the run directory already holds measured step times, in wall-clock terms.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from dcgan.config import Config, config_to_dict
from dcgan.distributed.env import DistInfo
from dcgan.run.checkpoint import latest_checkpoint
from dcgan.run.rundir import RunDir
from dcgan.run.stats import read_stats


def measured_step_ms(run_dir: Path) -> float | None:
    """The step time of the newest metric line of an existing run directory, if any."""
    timed = [row["step_time_ms"] for row in read_stats(RunDir(run_dir).stats) if "step_time_ms" in row]
    return float(timed[-1]) if timed else None


def data_lines(config: Config, world_size: int) -> tuple[list[str], int]:
    """What each rank reads, and steps per epoch (the same for every rank and any number of ranks)."""
    from dcgan.data.build import build_source
    from dcgan.data.digits import DigitsSource
    from dcgan.data.stream import ShardSource

    info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    source = build_source(config, info)
    try:
        steps = source.batches_per_epoch
        global_batch = config.global_batch(world_size)
        if isinstance(source, DigitsSource):
            images = len(source.images)
            return [
                f"data: built-in digits, {images} images; one permutation per epoch, each rank its slice of every "
                "global batch"
            ], steps
        assert isinstance(source, ShardSource), "a source is the digits or shards"
        shards, plan = source.shards, source.plan
        total = f"{shards.total} images" if shards.total is not None else "image count unknown (no manifest)"
        draw = (
            f"reading its share of a new deal of all {len(shards.urls)} shards every epoch, then further deals "
            "(data.resampled=true)"
            if config.data.resampled
            else "reading its share of a new deal of the shards every epoch (data.resampled=false)"
        )
        lines = [
            f"data: {config.data.shards}: {len(shards.urls)} shard(s), {total}",
            f"  {plan.partitions} partitions (data.partitions) of {plan.chunk} images a step, each {draw}; "
            f"each rank reads {len(plan.mine)}; {steps * global_batch} images per epoch",
        ]
        return lines, steps
    finally:
        source.close()


def cadence(name: str, every: int, step_ms: float | None) -> str:
    wall = f" (~{format_seconds(every * step_ms / 1000)})" if step_ms else ""
    return f"  {name:<11} every {every} steps{wall}"


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def describe(config: Config, world_size: int) -> str:
    """The dry-run report of a training run with `world_size` ranks."""
    t, run_dir = config.train, Path(config.run.dir)
    global_batch = config.global_batch(world_size)
    data, batches_per_epoch = data_lines(config, world_size)
    step_ms = measured_step_ms(run_dir)
    resume = latest_checkpoint(RunDir(run_dir).checkpoints)
    lines = [
        "resolved config:",
        *("  " + line for line in yaml.safe_dump(config_to_dict(config), sort_keys=False).splitlines()),
        f"world size: {world_size} rank(s); batch {config.batch_per_rank(world_size)} per rank, global batch {global_batch}",
        *data,
        f"steps per epoch: {batches_per_epoch}; train.steps {t.steps} = {t.steps / max(batches_per_epoch, 1):.1f} epochs, "
        f"{t.steps * global_batch} images",
        f"run.dir: {run_dir} ({f'resumes from {resume.name}' if resume else 'starts fresh'})",
        "cadence"
        + (
            f" (at the {step_ms:.0f} ms/step last measured in {RunDir(run_dir).stats}):"
            if step_ms
            else " (wall clock unknown until the run has logged a step):"
        ),
        cadence("metrics", config.log.every, step_ms),
        cadence("samples", config.sample.every, step_ms),
        cadence("checkpoint", config.checkpoint.every, step_ms),
    ]
    if config.eval.every:
        lines.append(cadence("eval", config.eval.every, step_ms))
    if step_ms:
        lines.append(f"  whole run   ~{format_seconds(t.steps * step_ms / 1000)} of training")
    return "\n".join(lines)
