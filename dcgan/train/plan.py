"""`--dry-run`: what a run would do, printed before anything trains or is submitted.

A 512-GPU job that reads the wrong shards or checkpoints every 40 minutes instead of every 4 costs a
queue wait to find out. The plan resolves everything that can be known without training: the config,
the world size and global batch, the data each rank will read, steps per epoch, the cadences in steps
and, where the run directory already holds measured step times, in wall-clock terms, and the checkpoint
interval that loses the least work to failures at this job's size (dcgan.run.interval).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import torch
import yaml

from dcgan.config import Config, config_to_dict
from dcgan.distributed.env import DistInfo
from dcgan.run.checkpoint import latest_checkpoint
from dcgan.run.interval import (
    ASYNC_STAGING_BYTES_PER_S,
    META_1024,
    SAVE_OVERHEAD_S,
    SYNC_WRITE_BYTES_PER_S,
    advise,
    estimated_save_s,
)
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


SAVE_LOGGED = re.compile(r"checkpoint of step \d+ complete: .* \(its save blocked training ([0-9.]+) s\)")
LOG_TAIL_BYTES = 1 << 18
"""How much of the end of train.log is searched for logged saves: the newest ones, and a bounded read."""


def measured_save_s(run_dir: Path) -> float | None:
    """The median time the saves logged at the end of the run's train.log blocked training, if any."""
    path = RunDir(run_dir).train_log
    if not path.is_file():
        return None
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        text = file.read().decode(errors="replace")
    blocked = [float(value) for value in SAVE_LOGGED.findall(text)]
    return statistics.median(blocked) if blocked else None


def checkpoint_bytes(config: Config, newest: Path | None) -> tuple[int, str]:
    """The size of a checkpoint of this run: the newest one's on disk, or else the model's fp32 weights
    and Adam's two moments (12 bytes a parameter) plus the weight average's 4 a G parameter. The models
    are built on the meta device: no memory, no initialization cost, whatever their width."""
    if newest is not None:
        return sum(file.stat().st_size for file in newest.rglob("*") if file.is_file()), f"{newest.name} on disk"
    from dcgan.gan.models import Discriminator, Generator, count_parameters

    with torch.device("meta"):
        g, d = count_parameters(Generator(config.model)), count_parameters(Discriminator(config.model))
    ema = 4 * g if config.train.ema > 0 else 0
    return 12 * (g + d) + ema, f"{g + d:,} parameters x 12 B"


def save_cost(config: Config, run_dir: Path, newest: Path | None) -> tuple[float, str]:
    """Seconds a save blocks training, and where the figure comes from: the run's own logged saves, or
    an estimate from the checkpoint's size at the rate benchmarks/checkpoint_cost.py measured."""
    measured = measured_save_s(run_dir)
    if measured is not None:
        return measured, f"measured: the median of the saves logged in {RunDir(run_dir).train_log}"
    size, what = checkpoint_bytes(config, newest)
    async_save = config.checkpoint.async_save
    rate = ASYNC_STAGING_BYTES_PER_S if async_save else SYNC_WRITE_BYTES_PER_S
    kind = "staging (checkpoint.async_save=true)" if async_save else "writing (checkpoint.async_save=false)"
    basis = f"estimated: {size / 1e6:,.1f} MB ({what}) at {rate / 1e9:.2f} GB/s {kind}, + {SAVE_OVERHEAD_S} s"
    return estimated_save_s(size, async_save), basis


def checkpoint_advice(config: Config, world_size: int, step_ms: float | None, newest: Path | None) -> list[str]:
    """Two lines: the save cost and the job's MTBF assumed, then the interval they imply (Young/Daly)
    beside checkpoint.every."""
    save_s, basis = save_cost(config, Path(config.run.dir), newest)
    every = config.checkpoint.every
    advice = advise(save_s, world_size, every, step_ms / 1000 if step_ms else None)
    rate = META_1024
    lines = [
        f"checkpoint interval (Young/Daly): a save blocks training ~{save_s:.3g} s ({basis}); a job of "
        f"{world_size} GPU(s) fails every ~{format_seconds(advice.mtbf_s)} (scaled per GPU from {rate.hours} h at "
        f"{rate.gpus:,} GPUs: {rate.source})"
    ]
    best = f"  least work lost saving every ~{format_seconds(advice.interval_s)} of training"
    if not step_ms or advice.ratio is None or advice.excess is None:
        return [*lines, f"{best}; checkpoint.every={every} in time unknown until the run has logged a step"]
    steps = max(1, round(advice.interval_s * 1000 / step_ms))
    verdict = (
        f"far from it, losing {advice.excess:.1f}x the least: checkpoint.every={steps} is the advice"
        if advice.far
        else "close enough (within 2x)"
    )
    return [*lines, f"{best} = ~{steps} steps; checkpoint.every={every} is {advice.ratio:.2g}x that: {verdict}"]


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
    lines += checkpoint_advice(config, world_size, step_ms, resume)
    return "\n".join(lines)
