"""The doctor's measurements that need every rank at once: all-reduce latency and bus bandwidth at the
size of G's and D's gradients, and the exchange rate of every pair of hosts (one rank per host, pairs
scheduled in rounds so that no host is in two pairs at a time).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from dcgan.cluster.bench import timed_seconds
from dcgan.cluster.doctor_report import SMALL_ELEMENTS, DoctorOptions, PairTiming, RankReport
from dcgan.config import Config
from dcgan.console import say
from dcgan.distributed.collectives import gather_objects, wait_for_every_rank
from dcgan.distributed.env import DistInfo
from dcgan.gan.models import Discriminator, Generator

T = TypeVar("T")


def together(info: DistInfo) -> None:
    """Wait for every rank (host-side gloo group), so that the next measurement starts everywhere at once."""
    wait_for_every_rank(info)


def progress(info: DistInfo, what: str) -> None:
    if info.is_main:
        say(what)


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
