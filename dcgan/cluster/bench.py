"""`dcgan bench step|data`: the training step against the pytorch/examples reference step, and the
loader's throughput from shards on disk.

The two steps run in ONE process on the same synthetic uint8 batch already on the device, so their ratio is
meaningful whatever else the machine is doing. The reference is pytorch/examples' dcgan recipe: fp32,
eager, NCHW, D ending in a Sigmoid with BCELoss, real and fake losses backpropagated separately.
Optionally the end-to-end rate of the real training loop from shards on disk is measured as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcgan.config import Config, ConfigError, load_config, replace
from dcgan.console import say
from dcgan.data.build import build_source
from dcgan.distributed.env import DistInfo, pick_device
from dcgan.distributed.session import destroy_distributed, init_distributed
from dcgan.gan.cuda_graph import WARMUP_STEPS, make_runner
from dcgan.gan.reference import ReferenceStep
from dcgan.gan.step import build_step


@dataclass
class Timing:
    img_per_s: float
    peak_mem_gib: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(run_once: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds that `iters` calls of `run_once` take after `warmup` untimed ones (which absorb
    compilation, worker start-up and CUDA-graph capture); queued GPU work is drained at both ends."""
    for _ in range(warmup):
        run_once()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(iters):
        run_once()
    _sync(device)
    return time.perf_counter() - started


def untimed_steps(config: Config, warmup: int) -> int:
    """Warm-up steps for the project's step: in CUDA-graph mode the capture must be among them."""
    return max(warmup, WARMUP_STEPS + 1) if config.train.cuda_graph else warmup


def time_step(step: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, warmup: int, iters: int) -> Timing:
    """Images per second of `step` on a fixed batch, and the peak GPU memory of the timed steps."""
    device = images.device
    elapsed = timed_seconds(lambda: step(images), warmup, iters, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return Timing(iters * images.shape[0] / elapsed, peak)


def time_configured_step(
    config: Config, info: DistInfo, images: torch.Tensor, warmup: int, iters: int, seconds: float = 0.0
) -> Timing:
    """The project's step as training builds and runs it (precision, compile, CUDA graph) for `info`'s
    ranks, timed on `images` after `untimed_steps(config, warmup)`: `iters` steps; or, given `seconds`,
    one timed step first and then as many as it says fit in `seconds` (at least `iters`), on the same
    built step, so that a slow device is not timed for minutes nor a fast one for a few milliseconds.
    The one place that times the configured step: `dcgan bench step` and `dcgan doctor` both call it."""
    runner = make_runner(build_step(config, info)[2], config, info)
    if seconds <= 0:
        return time_step(runner, images, untimed_steps(config, warmup), iters)
    probe = time_step(runner, images, untimed_steps(config, warmup), 1)
    return time_step(runner, images, 0, max(iters, round(seconds * probe.img_per_s / images.shape[0])))


def bench_config(base: Config, batch_size: int, precision: str | None) -> Config:
    sections: dict[str, dict[str, object]] = {"train": {"batch_size": batch_size, "global_batch": 0}}
    if precision:
        sections["train"]["precision"] = precision
    return replace(base, **sections)


def synthetic_batch(config: Config, device: torch.device) -> torch.Tensor:
    m = config.model
    shape = (config.train.batch_size, m.channels, m.resolution, m.resolution)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)


def end_to_end_share(rate: float, synthetic: float) -> str:
    """The end-to-end rate as a share of the synthetic-data rate. More than the synthetic rate is
    impossible for the same step; it means the machine's load changed between the two measurements."""
    if rate > 1.1 * synthetic:
        return "faster than the synthetic-data rate measured before it: the machine's load changed in between; rerun on an idle machine"
    return f"{rate / synthetic:.0%} of the synthetic-data rate"


def bench_step(
    config: Config,
    batch_size: int,
    precision: str | None,
    warmup: int,
    iters: int,
    group_of_one: DistInfo | None = None,
) -> dict[str, Timing]:
    """Timings of the reference step, the project's step and (given a process group of one) the
    project's multi-rank code path, for one batch size, in this process."""
    config = bench_config(config, batch_size, precision)
    device = pick_device(config.train.device, 0)
    info = DistInfo.single(device)
    images = synthetic_batch(config, device)
    say(f"batch {batch_size}: the reference step, {warmup} untimed + {iters} timed steps")
    timings = {"reference": time_step(ReferenceStep(config, device), images, warmup, iters)}
    for name, step_info in (("dcgan", info), ("distributed", group_of_one)):
        if step_info is not None:
            say(
                f"batch {batch_size}: the {name} step (compile={config.train.compile}, precision={config.train.precision}), {iters} timed steps"
            )
            timings[name] = time_configured_step(config, step_info, images, warmup, iters)
    return timings


def run_bench_step(
    config_path: str,
    overrides: list[str],
    batch_sizes: list[int],
    precision: str | None,
    warmup: int,
    iters: int,
    shards: str = "",
    distributed: bool = False,
) -> list[dict[str, float]]:
    """Print one row per batch size: reference img/s, project img/s, their ratio, peak memory (and with
    `distributed`, the multi-rank code path run by one process, with its ratio to the reference);
    then the end-to-end rate from shards when given."""
    base = load_config(config_path, overrides)
    group_of_one = init_distributed(base.train.device, base.dist.timeout_s, force=True) if distributed else None
    try:
        extra = f" {'1-rank dist img/s':>18} {'ratio':>6}" if distributed else ""
        print(
            f"{'batch':>6} {'reference img/s':>16} {'dcgan img/s':>12} {'ratio':>6}{extra} {'peak GiB':>9}", flush=True
        )
        rows = []
        for batch in batch_sizes:
            timings = bench_step(base, batch, precision, warmup, iters, group_of_one)
            reference, ours = timings["reference"].img_per_s, timings["dcgan"].img_per_s
            row = {"batch": batch, "reference": reference, "dcgan": ours, "ratio": ours / reference}
            line = f"{batch:>6} {reference:>16.0f} {ours:>12.0f} {ours / reference:>6.2f}"
            if "distributed" in timings:
                row["distributed"] = timings["distributed"].img_per_s
                line += f" {row['distributed']:>18.0f} {row['distributed'] / reference:>6.2f}"
            peak = max(t.peak_mem_gib for name, t in timings.items() if name != "reference")
            print(f"{line} {peak:>9.2f}", flush=True)
            rows.append(row)
    finally:
        destroy_distributed()
    if shards:
        for row in rows:
            say(f"batch {int(row['batch'])}: training end to end from {shards}, {iters} timed steps")
            rate = bench_end_to_end(base, shards, int(row["batch"]), precision, warmup, iters)
            row["end_to_end"] = rate
            print(
                f"end to end from {shards}, batch {int(row['batch'])}: {rate:.0f} img/s "
                f"({end_to_end_share(rate, row['dcgan'])})",
                flush=True,
            )
    return rows


def bench_end_to_end(
    config: Config, shards: str, batch_size: int, precision: str | None, warmup: int, iters: int
) -> float:
    """Training img/s with batches streamed from shards on disk through the real loader (the same step
    settings as the synthetic-data timing, precision included)."""
    config = replace(bench_config(config, batch_size, precision), data={"shards": shards})
    device = pick_device(config.train.device, 0)
    info = DistInfo.single(device)
    runner = make_runner(build_step(config, info)[2], config, info)
    data = build_source(config, info)
    batches = iter(data)
    try:
        elapsed = timed_seconds(
            lambda: runner(next(batches).to(device, non_blocking=True)), untimed_steps(config, warmup), iters, device
        )
        return iters * batch_size / elapsed
    finally:
        data.close()


def delivered(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as training receives it: on the device, every byte read once. On a GPU the copy reads it;
    on the CPU `.to` is a no-op, so the batch is copied, as the step's normalization reads it (a batch
    left unread in a worker's shared memory costs its page faults to whoever reads it first)."""
    return batch.to(device, non_blocking=True) if device.type == "cuda" else batch.clone()


def measure_loader(
    shards: str,
    workers: int,
    batch_size: int,
    batches: int,
    partitions: int = 0,
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """Images per second the shard loader delivers to the training device (`device`, default the first
    GPU or the CPU): pinned and copied to the GPU when there is one, as in training. A first batch is
    taken before timing (worker start-up). A rank of a multi-GPU job passes its own device: choosing one
    here would make the first GPU the process's current device."""
    from dcgan.data.shards import resolve_shards
    from dcgan.data.stream import ShardSource

    manifest = resolve_shards(shards).manifest
    if manifest is None:
        raise ConfigError(
            "dcgan bench data: point DATA at a shard directory (or http(s) directory URL) with manifest.json"
        )
    config = load_config(
        None,
        [
            f"data.shards={shards}",
            f"data.workers={workers}",
            f"data.partitions={partitions}",
            f"train.batch_size={batch_size}",
            f"seed={seed}",
            f"model.resolution={manifest.resolution}",
            f"model.channels={manifest.channels}",
            f"data.epoch_samples={batch_size * (batches + 1)}",
        ],
    )
    device = device or pick_device("auto", 0)
    source = ShardSource(config, DistInfo.single(device))
    try:
        stream = iter(source)
        elapsed = timed_seconds(lambda: delivered(next(stream), device), 1, batches, device)
        return batches * batch_size / elapsed
    finally:
        source.close()


def run_bench_data(
    shards: str, worker_counts: list[int], batch_size: int, batches: int, per_worker: list[int]
) -> dict[tuple[int, int], float]:
    """Print one row per (worker count, partitions per worker): the images per second delivered to the
    device, and the rate against one partition per worker (each worker one stream) in the same run."""
    print(
        f"{'workers':>8} {'partitions':>10} {'img/s':>10} {'vs 1/worker':>12}   (delivered to {pick_device('auto', 0)})"
    )
    rates: dict[tuple[int, int], float] = {}
    for workers in worker_counts:
        for each in per_worker:
            partitions = max(workers, 1) * each
            if batch_size % partitions:
                print(f"{workers:>8} {partitions:>10} {'-':>10}   (batch {batch_size} is not a multiple)", flush=True)
                continue
            rate = rates[workers, each] = measure_loader(shards, workers, batch_size, batches, partitions)
            base = rates.get((workers, per_worker[0]))
            ratio = f"{rate / base:.2f}x" if base else "-"
            print(f"{workers:>8} {partitions:>10} {rate:>10.0f} {ratio:>12}", flush=True)
    return rates
