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
itself ends the job as in training: dcgan.liveness names the lost peer in one line.

Exit status (the same on every rank): 0 nothing found; EXIT_PREFLIGHT_BROKEN (7) a check failed on some
rank; EXIT_PREFLIGHT_FAR_OFF (8) a rank's step, loader or write rate is below the other ranks' median by more
than --outlier times, or a pair of hosts is that far below the fastest pair.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from dcgan.bench import (
    bench_config,
    measure_loader,
    show_progress,
    synthetic_batch,
    time_configured_step,
    timed_seconds,
)
from dcgan.config import Config
from dcgan.distributed import DistInfo, distributed_session, gather_objects, launched_world_size
from dcgan.errors import EXIT_OK, EXIT_PREFLIGHT_BROKEN, EXIT_PREFLIGHT_FAR_OFF, DcganError, one_line, tell_launcher
from dcgan.models import Discriminator, Generator
from dcgan.tracking import setup_logging

T = TypeVar("T")


@dataclass(frozen=True)
class DoctorOptions:
    """How long and how hard `dcgan doctor` measures, and what it calls far off."""

    seconds: float = 3.0
    """Time budget of each measurement (warm-up and start-up come on top)."""
    outlier: float = 1.5
    """A rank (or pair of hosts) this many times slower than the other ranks' median (the fastest pair) is far off."""
    write_mib: int = 64
    """Most MiB each rank writes into run.dir's file system (less where --seconds runs out first)."""
    pair_mib: float = 8.0
    """MiB sent each way between two hosts' leader ranks, per timed exchange."""
    json_path: str = ""
    """Where rank 0 writes the results as JSON (empty: not written)."""


@dataclass
class PairTiming:
    """One transfer between two hosts' leader ranks: `mb_s` counts both directions' bytes."""

    hosts: tuple[str, str]
    mb_s: float


@dataclass
class RankReport:
    """What one rank measured; None where a check failed (its line is in `errors`) or does not apply."""

    rank: int
    host: str
    device: str
    threads: int
    cpus: int
    step_img_s: float | None = None
    loader_img_s: float | None = None
    write_mb_s: float | None = None
    data_note: str = ""
    allreduce_s: float | None = None
    """Median seconds of this rank's all-reduces of the gradients' size."""
    small_allreduce_s: float | None = None
    pairs: list[PairTiming] = field(default_factory=list)
    """The host pairs this rank timed, as its host's leader."""
    errors: list[str] = field(default_factory=list)
    """One line per failed check, "<check>: <the error's line>"."""


@dataclass
class CollectiveTiming:
    """An all-reduce of `elements` float32 over `ranks`, timed by the slowest rank's median."""

    elements: int
    ranks: int
    seconds: float

    @property
    def bus_gb_s(self) -> float:
        """nccl-tests' bus bandwidth: what each link carried, comparable across rank counts."""
        return 2 * (self.ranks - 1) / self.ranks * self.elements * 4 / self.seconds / 1e9


@dataclass
class Verdict:
    """Rank 0's judgement of all reports: flags per rank, slow pairs, and the exit status."""

    flags: dict[int, list[str]]
    slow_pairs: list[PairTiming]
    fastest_pair: PairTiming | None
    suspect_hosts: list[str]
    line: str
    exit_status: int


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


@dataclass
class DataCheck:
    """What one rank found of the configured data: a line, and the loader's rate where measured."""

    note: str
    img_s: float | None = None


def check_data(config: Config, info: DistInfo, seconds: float) -> DataCheck:
    """The shards as this rank sees them: manifest, shape, the first image of one shard, the loader's
    rate. Raises (ShardError, ConfigError, ...) with the line training would print."""
    if config.uses_builtin_digits:
        return DataCheck("built-in digits: no shards to read")
    from dcgan.data.stream import check_shape, read_images, resolve_shards

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


def together(info: DistInfo) -> None:
    """Wait for every rank (host-side gloo group), so that the next measurement starts everywhere at once."""
    if info.distributed:
        dist.barrier(group=info.flag_group)


def progress(info: DistInfo, what: str) -> None:
    if info.is_main:
        show_progress(what)


MIN_REPEATS = 5
MAX_REPEATS = 1000


def repeated_seconds(run_once: Callable[[], object], seconds: float, info: DistInfo) -> list[float]:
    """Seconds of each of several calls of a collective `run_once` (one untimed first). Every rank must
    call it equally often: the count comes from the slowest rank's first timing."""
    first = timed_seconds(run_once, 1, 1, info.device)
    slowest = torch.tensor([first], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=info.flag_group)
    count = int(min(MAX_REPEATS, max(MIN_REPEATS, seconds / max(slowest.item(), 1e-9))))
    return [first] + [timed_seconds(run_once, 0, 1, info.device) for _ in range(count)]


def allreduce_seconds(elements: int, info: DistInfo, seconds: float) -> float:
    """Median seconds of an all-reduce of `elements` float32 on this rank's device, in the default
    group: the collective that averages gradients in training."""
    tensor = torch.zeros(elements, dtype=torch.float32, device=info.device)
    return statistics.median(repeated_seconds(lambda: dist.all_reduce(tensor), seconds, info))


def gradient_elements(config: Config) -> int:
    """Parameters of G and D: the floats a step's gradient all-reduces carry."""
    models = (Generator(config.model), Discriminator(config.model))
    return sum(p.numel() for model in models for p in model.parameters())


SMALL_ELEMENTS = 8
"""A small all-reduce's size: its time is the collective's latency."""


def pair_rounds(count: int) -> list[list[tuple[int, int]]]:
    """Every pair of `count` hosts once, in rounds of disjoint pairs (the circle method of round-robin
    tournaments: count - 1 rounds, count if odd): a round's pairs share no host, so they run at once
    without one pair's traffic slowing another's, and the whole takes rounds, not count^2/2 transfers."""
    slots: list[int | None] = [*range(count), *([None] if count % 2 else [])]
    rounds = []
    for _ in range(len(slots) - 1):
        half = len(slots) // 2
        pairs = [(slots[i], slots[-1 - i]) for i in range(half)]
        rounds.append(sorted((min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None))
        slots = [slots[0], slots[-1], *slots[1:-1]]
    return rounds


PAIR_REPEATS = 3
"""Timed exchanges per pair of hosts (after one untimed: connections, a pair's NCCL communicator)."""


def exchange_rate(buffer: torch.Tensor, peer: int, leads: bool, device: torch.device) -> float | None:
    """Send `buffer` to `peer` and receive it back, PAIR_REPEATS + 1 times; the leading side returns the
    rate in MB/s (both directions' bytes over the median round trip), the other None."""

    def exchange() -> None:
        if leads:
            dist.send(buffer, peer)
            dist.recv(buffer, peer)
        else:
            dist.recv(buffer, peer)
            dist.send(buffer, peer)

    times = [timed_seconds(exchange, 0, 1, device) for _ in range(PAIR_REPEATS + 1)][1:]
    return 2 * buffer.nbytes / statistics.median(times) / 1e6 if leads else None


def host_pair_rates(hosts: list[str], info: DistInfo, mib: float) -> list[PairTiming]:
    """The pairs of hosts this rank timed as its host's leader (its lowest rank). Rounds run one after
    another, with a barrier between them."""
    names = list(dict.fromkeys(hosts))
    leaders = [hosts.index(name) for name in names]
    buffer = torch.zeros(max(1, int(mib * 2**20) // 4), dtype=torch.float32, device=info.device)
    timed: list[PairTiming] = []
    for pairs in pair_rounds(len(names)):
        for a, b in pairs:
            if info.rank in (leaders[a], leaders[b]):
                leads = info.rank == leaders[a]
                rate = exchange_rate(buffer, leaders[b] if leads else leaders[a], leads, info.device)
                if rate is not None:
                    timed.append(PairTiming((names[a], names[b]), rate))
        together(info)
    return timed


def measure_network(report: RankReport, config: Config, info: DistInfo, options: DoctorOptions) -> None:
    """The collectives' timings this rank takes part in, into its report (nothing for one rank)."""
    if info.world_size < 2:
        return
    hosts = gather(report.host, info)
    elements = gradient_elements(config)
    progress(info, f"all-reduce of {elements} floats (G and D's gradients) and of {SMALL_ELEMENTS}")
    together(info)
    report.allreduce_s = allreduce_seconds(elements, info, options.seconds)
    report.small_allreduce_s = allreduce_seconds(SMALL_ELEMENTS, info, options.seconds)
    if len(set(hosts)) > 1:
        progress(info, f"{options.pair_mib:g} MiB each way between every pair of hosts")
        together(info)
        report.pairs = host_pair_rates(hosts, info, options.pair_mib)


def gather(value: T, info: DistInfo) -> list[T]:
    """Every rank's `value`, in rank order, on every rank (pickled over the host-side gloo group)."""
    return gather_objects(value, info.flag_group, info.world_size if info.distributed else 1)


# --- the judgement and the table ---------------------------------------------------------------------


def ratios_to_median(values: list[float | None]) -> list[float | None]:
    """Each value over the median of the OTHER measured ones (None where not measured, or alone): a rank
    is not part of what it is compared with, so that with two ranks a rank half as fast reads 0.5x, not
    0.67x (the rule dcgan.stragglers follows in training)."""

    def ratio(index: int, value: float | None) -> float | None:
        others = [v for i, v in enumerate(values) if v is not None and i != index]
        if value is None or not others or statistics.median(others) <= 0:
            return None
        return value / statistics.median(others)

    return [ratio(index, value) for index, value in enumerate(values)]


RATES = (("step", "step_img_s"), ("loader", "loader_img_s"), ("write", "write_mb_s"))
"""The per-rank rates compared with the other ranks' median: (name in a flag, RankReport field)."""


def judge(reports: list[RankReport], outlier: float) -> Verdict:
    """Flag each rank whose rate is below the other ranks' median by more than `outlier` times, each pair of hosts
    that far below the fastest pair (the median pair would not do: with one slow host of three, two of
    the three pairs are slow), and the hosts found in every slow pair; then the exit status."""
    flags: dict[int, list[str]] = {r.rank: [] for r in reports}
    for name, attribute in RATES:
        for report, ratio in zip(reports, ratios_to_median([getattr(r, attribute) for r in reports]), strict=True):
            if ratio is not None and ratio < 1 / outlier:
                flags[report.rank].append(f"SLOW {name} {ratio:.2f}x")
    pairs = [pair for r in reports for pair in r.pairs]
    fastest = max(pairs, key=lambda p: p.mb_s, default=None)
    slow = sorted((p for p in pairs if fastest is not None and p.mb_s < fastest.mb_s / outlier), key=lambda p: p.mb_s)
    suspects = sorted(set.intersection(*(set(p.hosts) for p in slow))) if slow else []
    for report in reports:
        if report.host in suspects:
            flags[report.rank].append("SLOW LINK")
    broken = [f"rank {r.rank} on {r.host}: {error}" for r in reports for error in r.errors]
    far_off = [f"rank {rank} on {reports[rank].host}: {', '.join(f)}" for rank, f in flags.items() if f]
    if slow:
        far_off.append(f"slowest pair of hosts {'-'.join(slow[0].hosts)} at {slow[0].mb_s:.1f} MB/s")
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        line, status = f"BROKEN: {broken[0]}{more}", EXIT_PREFLIGHT_BROKEN
    elif far_off:
        line, status = f"FAR OFF: {'; '.join(far_off)}", EXIT_PREFLIGHT_FAR_OFF
    else:
        line, status = f"ok: {len(reports)} rank(s), nothing far off", EXIT_OK
    return Verdict(flags, slow, fastest, suspects, f"verdict: {line} (exit {status})", status)


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(reports: list[RankReport], verdict: Verdict) -> str:
    """One row per rank: who it is, its rates, its status (ok, BROKEN, or its flags)."""
    ratios = ratios_to_median([r.step_img_s for r in reports])
    rows = [
        ("rank", "host", "device", "threads", "cpus", "step img/s", "vs others", "loader img/s", "write MB/s", "status")
    ]
    for report, ratio in zip(reports, ratios, strict=True):
        status = "BROKEN" if report.errors else ", ".join(verdict.flags[report.rank]) or "ok"
        rows.append(
            (
                str(report.rank),
                report.host,
                report.device,
                str(report.threads),
                str(report.cpus),
                _number(report.step_img_s),
                "-" if ratio is None else f"{ratio:.2f}x",
                _number(report.loader_img_s),
                _number(report.write_mb_s),
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = {1, 2, 9}
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def collective_lines(reports: list[RankReport], elements: int) -> list[str]:
    """The all-reduces, timed by the slowest rank's median (a collective ends when its slowest rank does)."""
    if len(reports) < 2:
        return ["collectives: one rank, none to time"]
    if any(r.allreduce_s is None or r.small_allreduce_s is None for r in reports):
        return ["collectives: not timed"]
    big = CollectiveTiming(elements, len(reports), max(r.allreduce_s or 0.0 for r in reports))
    small = CollectiveTiming(SMALL_ELEMENTS, len(reports), max(r.small_allreduce_s or 0.0 for r in reports))
    return [
        f"all-reduce of the gradients ({elements} floats, {elements * 4 / 2**20:.2f} MiB) over {big.ranks} ranks: "
        f"{big.seconds * 1e3:.2f} ms, bus bandwidth {big.bus_gb_s:.3f} GB/s",
        f"all-reduce of {SMALL_ELEMENTS} floats (latency): {small.seconds * 1e3:.3f} ms",
    ]


def pair_line(reports: list[RankReport], verdict: Verdict, pair_mib: float) -> str:
    """The slowest pair of hosts, against the fastest; with one host, that there are no pairs."""
    pairs = sorted((p for r in reports for p in r.pairs), key=lambda p: p.mb_s)
    if not pairs:
        return "host pairs: one host, no pairs of hosts to time"
    slowest = pairs[0]
    head = f"host pairs ({len(pairs)}, {pair_mib:g} MiB each way): slowest {'-'.join(slowest.hosts)} {slowest.mb_s:.1f} MB/s"
    if len(pairs) == 1:
        return f"{head} (one pair: nothing to compare it with)"
    fastest = pairs[-1]
    text = f"{head}, fastest {'-'.join(fastest.hosts)} {fastest.mb_s:.1f} MB/s ({slowest.mb_s / fastest.mb_s:.2f}x)"
    if verdict.slow_pairs:
        text += f"; SLOW: {', '.join('-'.join(p.hosts) for p in verdict.slow_pairs)}"
        if verdict.suspect_hosts:
            text += f"; in every slow pair: {', '.join(verdict.suspect_hosts)}"
    return text


def data_line(reports: list[RankReport]) -> str:
    """What the ranks found of the data, once per distinct finding; the ranks whose check failed."""
    found = sorted({r.data_note for r in reports if r.data_note})
    failed = [str(r.rank) for r in reports if any(e.startswith("data: ") for e in r.errors)]
    if failed:
        found.append(f"unreadable from rank(s) {', '.join(failed)} (above)")
    return "data: " + "; ".join(found)


def describe(reports: list[RankReport], verdict: Verdict, elements: int, options: DoctorOptions) -> str:
    """The whole printout: the table, a line per failed check, the network, the data, the verdict."""
    lines = [table(reports, verdict)]
    lines += [f"rank {r.rank} on {r.host}: {error}" for r in reports for error in r.errors]
    lines += collective_lines(reports, elements)
    lines.append(pair_line(reports, verdict, options.pair_mib))
    lines.append(data_line(reports))
    lines.append(verdict.line)
    return "\n".join(lines)


def write_json(path: Path, reports: list[RankReport], verdict: Verdict, elements: int, options: DoctorOptions) -> None:
    """The same results for a script: every rank's report, the network's timings, the verdict."""
    collectives = None
    if len(reports) > 1 and all(r.allreduce_s is not None for r in reports):
        big = CollectiveTiming(elements, len(reports), max(r.allreduce_s or 0.0 for r in reports))
        collectives = {"gradient_elements": elements, "allreduce_s": big.seconds, "bus_gb_s": big.bus_gb_s}
        collectives["small_allreduce_s"] = max(r.small_allreduce_s or 0.0 for r in reports)
    document = {
        "ranks": [{**asdict(r), "flags": verdict.flags[r.rank]} for r in reports],
        "collectives": collectives,
        "pairs": [asdict(p) for r in reports for p in r.pairs],
        "slow_pairs": [asdict(p) for p in verdict.slow_pairs],
        "suspect_hosts": verdict.suspect_hosts,
        "options": asdict(options),
        "verdict": verdict.line,
        "exit_status": verdict.exit_status,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))


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
