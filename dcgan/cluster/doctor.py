"""`dcgan doctor`: a preflight of an allocation, run the way training runs (one process, torchrun,
srun + torchrun), that says in one table whether every rank can train and whether one will hold the
others back.

Why: a job of N ranks runs at the pace of its slowest rank and its slowest link, and fails wherever one
rank cannot read its shards or write its checkpoints. Found in a minute before a long job, each of these
is one line naming a rank or a pair of hosts; found hours into it, it is a step rate lower than
expected with nobody named, or a crash.

Every rank measures, at the same time as the others (as training loads the machine):
- who it is: host, device, torch threads, the CPUs it may run on;
- the configured model's step rate on a synthetic batch of its per-rank size, built for ONE process on
  the rank's device (`bench.time_configured_step`): no collectives, so a slow rank cannot hide behind the
  others waiting for it at every all-reduce; compared with the median of the other ranks;
- the shards: the manifest and the first image of one shard (rank r reads shard r mod n, so the ranks
  together touch many), then the loader's rate (`bench.measure_loader`, the rank's data.workers);
- the write rate of run.dir's file system: a temporary file of up to --write-mib written and fsynced,
  then removed. run.dir is not created: where it does not exist yet, its nearest existing parent is
  measured (the file system it will be made on).
Then all ranks together, on the backend training uses (NCCL on GPUs, gloo on CPUs): an all-reduce of a
float32 tensor the size of G's and D's gradients (bus bandwidth as nccl-tests defines it,
2(n-1)/n x bytes / time) and one of a small tensor (latency); and, one leader rank per host, --pair-mib
sent each way between every pair of hosts, in rounds of disjoint pairs, the slowest pair named.

A rank whose local check raises reports the error's line as its status instead of raising, so that
every rank still reaches every collective and rank 0 prints the whole table. An error in a collective
itself ends the job as in training: dcgan.distributed.liveness names the lost peer in one line.

Exit status (the same on every rank): 0 nothing found; EXIT_PREFLIGHT_BROKEN (7) a check failed on some
rank; EXIT_PREFLIGHT_FAR_OFF (8) a rank's step, loader or write rate is below the other ranks' median by more
than --outlier times, or a pair of hosts is that far below the fastest pair.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from dcgan.cluster.bench import bench_config, measure_loader, synthetic_batch, time_configured_step
from dcgan.cluster.doctor_links import gather, gradient_elements, measure_network, progress, together
from dcgan.cluster.doctor_report import DataCheck, DoctorOptions, RankReport, describe, judge, write_json
from dcgan.config import Config
from dcgan.console import setup_logging
from dcgan.distributed.env import DistInfo, launched_world_size
from dcgan.distributed.session import distributed_session
from dcgan.errors import EXIT_OK, DcganError, one_line, tell_launcher

T = TypeVar("T")


# --- one rank's own checks (no collectives) ----------------------------------------------------------


def attempt(check: str, measure: Callable[[], T], errors: list[str]) -> T | None:
    """`measure()`, or None with its error's line recorded: a rank whose check fails must still reach
    every collective, or the others would wait for it until dist.timeout_s."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - a failed check is this rank's report, not the end of the job
        errors.append(f"{check}: {one_line(exc)}")
        return None


def device_name(device: torch.device) -> str:
    """The device as the table shows it: a GPU with its model, since a job may mix them."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


def step_rate(config: Config, info: DistInfo, seconds: float) -> float:
    """Images per second of the configured step at this rank's batch, built for one process on this
    rank's device: the rank's own speed, which the collectives of a multi-rank step would hide."""
    local = bench_config(config, config.batch_per_rank(info.world_size), None)
    images = synthetic_batch(local, info.device)
    return time_configured_step(local, DistInfo.single(info.device), images, 2, 3, seconds).img_per_s


def check_data(config: Config, info: DistInfo, seconds: float) -> DataCheck:
    """The shards as this rank sees them: manifest, shape, the first image of one shard, the loader's
    rate. Raises (ShardError, ConfigError, ...) with the line training would print."""
    if config.uses_builtin_digits:
        return DataCheck("built-in digits: no shards to read")
    from dcgan.data.offline import read_images
    from dcgan.data.shards import check_shape, resolve_shards

    spec = config.data.shards
    shards = resolve_shards(spec, config.data.timeout_s)
    check_shape(shards, config)
    url = shards.urls[info.rank % len(shards.urls)]
    if not read_images(url, config.model.resolution, config.model.channels, positions={0}):
        raise DcganError(f"no readable image in {url}")
    found = f"{len(shards.urls)} shards" + (f", {shards.total} images" if shards.total is not None else "")
    if shards.manifest is None:
        return DataCheck(f"{spec} ({found}): readable; no manifest, so the loader's rate is not measured")
    batch = config.batch_per_rank(info.world_size)

    def loader(batches: int) -> float:
        d = config.data
        # a seed per rank: ranks of one host reading the same shards in the same order would find them in
        # the page cache (or the server's) and look faster than they will be
        return measure_loader(spec, d.workers, batch, batches, seed=config.seed + info.rank, device=info.device)

    probe = loader(2)
    rate = loader(int(min(1000, max(3, seconds * probe / batch))))
    return DataCheck(f"{spec} ({found}): readable; loader at data.workers={config.data.workers}", rate)


WRITE_CHUNK = 4 << 20


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest parent that exists: where a run directory not made yet will be made."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_rate(run_dir: Path, mib: int, seconds: float) -> float:
    """MB/s of writing and fsyncing a temporary file in run.dir (or where it will be made), removed
    afterwards. Random bytes: a compressing file system would make zeros look fast. Every rank writes at
    once, as every rank writes its share of a checkpoint."""
    where = nearest_existing(run_dir)
    if not where.is_dir():
        raise DcganError(f"run.dir {run_dir}: {where} is not a directory")
    limit = mib << 20
    chunk = np.random.default_rng().bytes(min(WRITE_CHUNK, limit))
    fd, name = tempfile.mkstemp(dir=where, prefix=".dcgan-doctor-")
    written = 0
    try:
        started = time.perf_counter()
        while written < limit and (written == 0 or time.perf_counter() - started < seconds):
            written += os.write(fd, chunk)
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(name)
    return written / elapsed / 1e6


def examine_rank(config: Config, info: DistInfo, options: DoctorOptions) -> RankReport:
    """This rank's identity and local checks, each started by all ranks together (a barrier before
    each), so that ranks sharing a host, a disk or a shard server share them as in training."""
    report = RankReport(
        rank=info.rank,
        host=socket.gethostname(),
        device=device_name(info.device),
        threads=torch.get_num_threads(),
        cpus=len(os.sched_getaffinity(0)),
    )
    seconds = options.seconds
    progress(info, f"step rate of the configured model, one process per rank, about {seconds:g} s")
    together(info)
    report.step_img_s = attempt("step", lambda: step_rate(config, info, seconds), report.errors)
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    progress(info, "the shards and the loader's rate")
    together(info)
    data = attempt("data", lambda: check_data(config, info, seconds), report.errors)
    if data is not None:
        report.data_note, report.loader_img_s = data.note, data.img_s
    progress(info, f"write rate of run.dir's file system, up to {options.write_mib} MiB a rank")
    together(info)
    report.write_mb_s = attempt(
        "write", lambda: write_rate(Path(config.run.dir), options.write_mib, seconds), report.errors
    )
    return report


# --- all ranks together ------------------------------------------------------------------------------


# --- the judgement and the table ---------------------------------------------------------------------


# --- start to end ------------------------------------------------------------------------------------


def tell_launcher_verdict(line: str) -> None:
    """Put the verdict in torchrun's failure summary, which shows the worker's error file's call stack:
    recorded from inside an except block, that stack ends with the line. The doctor returns its status
    rather than raising: a rank that ends with an error while rank 0 still prints would be reported by
    rank 0's liveness watch as a failed peer."""
    try:
        raise DcganError(line)
    except DcganError as exc:
        tell_launcher(exc)


def doctor(config: Config, options: DoctorOptions) -> int:
    """Entry point of `dcgan doctor`: every rank examines itself, all time the network together, rank 0
    prints the table (and writes the JSON); returns the verdict's exit status, the same on every rank."""
    config.batch_per_rank(launched_world_size())  # as training: a global batch the ranks cannot share, at once
    with distributed_session(config.train.device, config.dist.timeout_s, liveness_s=config.dist.liveness_s) as info:
        setup_logging(None, info.rank)
        report = examine_rank(config, info, options)
        measure_network(report, config, info, options)
        reports = gather(report, info)
        verdict = judge(reports, options.outlier)
        if info.is_main:
            elements = gradient_elements(config)
            print(describe(reports, verdict, elements, options), flush=True)
            if options.json_path:
                write_json(Path(options.json_path), reports, verdict, elements, options)
                print(f"written to {options.json_path}", flush=True)
        # no rank ends before rank 0 has printed: torchrun stops a host's other workers as soon as one of
        # them exits with a non-zero status, and rank 0 may be one of them
        together(info)
        if verdict.exit_status != EXIT_OK:
            tell_launcher_verdict(verdict.line)
        return verdict.exit_status
