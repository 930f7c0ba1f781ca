"""Which rank is slow: each rank's own time per step, gathered once per metric window.

In synchronous data parallel every rank's step takes the same wall time, because the step's
collectives (cross-rank BatchNorm exchanges, the gradient all-reduce) make the fast ranks wait for
the slowest. A rank's wall time per step therefore cannot name a straggler; the time it spends NOT
waiting for its peers can. Each rank splits its step time into

- data wait: time in the loader, before the step (a slow disk, link or decoding on its host);
- collective wait: host time blocked in the step's collectives (waiting for peers, plus the transfer);
- the rest, its own compute.

A straggler has the largest own time (step minus collective wait): its peers wait for it, it waits
for nobody. The window's per-rank times travel in one small all-gather on the host-side (gloo) group
when the metric line is made, never inside the step.

What the clock sees: collectives that block the host, i.e. gloo on CPU. On CUDA the step's NCCL
collectives are queued on the GPU stream and a host clock cannot see their wait (that needs CUDA
events, or NCCL's flight recorder); there only the data wait tells ranks apart, which names a
data-bound straggler but not a compute-bound one.
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dcgan.distributed.collectives import gather_objects

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankTimes:
    """One rank's mean seconds per step over one metric window."""

    step_s: float
    data_wait_s: float
    collective_s: float
    """NaN where the host clock cannot see it (collectives queued on a GPU): see `estimate_waits`."""

    @property
    def own_s(self) -> float:
        """Time per step this rank did not spend waiting for its peers: its data wait and compute."""
        return max(self.step_s - self.collective_s, 0.0)

    @property
    def measured(self) -> bool:
        return not math.isnan(self.collective_s)


def estimate_waits(times: list[RankTimes]) -> list[RankTimes]:
    """Where the collective wait was not measured (NCCL), estimate it from the data waits alone,
    assuming equal compute on every rank: each rank waits in the collectives for as long as the rank
    with the longest data wait makes it, max(data wait) - its own. That names a data-bound straggler
    (and only that kind) with the same rule; measured times are returned as they are."""
    if all(t.measured for t in times):
        return times
    longest = max(t.data_wait_s for t in times)
    return [RankTimes(t.step_s, t.data_wait_s, longest - t.data_wait_s) for t in times]


def gather_rank_times(times: RankTimes, group: dist.ProcessGroup | None, world_size: int) -> list[RankTimes]:
    """Every rank's times, in rank order: one all-gather of three numbers on the host-side group."""
    if world_size == 1:
        return [times]
    mine = torch.tensor([times.step_s, times.data_wait_s, times.collective_s], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    return [RankTimes(*map(float, row.tolist())) for row in everyone]


def bound_kind(data_bound: bool) -> str:
    """What holds a slow rank back, in the words of the warning and of `dcgan report`: its loader or its
    compute (see `slowest_rank` for the rule that tells them apart)."""
    return "data-bound" if data_bound else "compute-bound"


@dataclass(frozen=True)
class Slowest:
    """The slowest rank of one window and how far it lags its peers."""

    rank: int
    host: str
    own_s: float
    others_median_s: float
    data_bound: bool
    """Whether its data wait, rather than its compute, makes most of its excess."""

    @property
    def excess(self) -> float:
        """Its own time over the median of the others' own time, as a fraction (0.5 = 50% slower)."""
        return self.own_s / max(self.others_median_s, 1e-9) - 1.0

    @property
    def kind(self) -> str:
        return bound_kind(self.data_bound)


def slowest_rank(times: list[RankTimes], hosts: list[str]) -> Slowest | None:
    """The rank with the largest own time, against the median of the others (None for one rank). With
    two ranks the median of the others is the other rank: the comparison is never diluted by itself."""
    if len(times) < 2:
        return None
    times = estimate_waits(times)
    rank = max(range(len(times)), key=lambda r: times[r].own_s)
    others = [t for r, t in enumerate(times) if r != rank]
    median_own = statistics.median(t.own_s for t in others)
    median_data = statistics.median(t.data_wait_s for t in others)
    excess_s = times[rank].own_s - median_own
    data_bound = excess_s > 0 and times[rank].data_wait_s - median_data > excess_s / 2
    return Slowest(rank, hosts[rank], times[rank].own_s, median_own, data_bound)


def straggler_metrics(slowest: Slowest | None, times: list[RankTimes]) -> dict[str, Any]:
    """What the metric line carries about ranks: the slowest, its host, its excess, and (where measured)
    the mean share of step time every rank spent waiting in collectives."""
    if slowest is None:
        return {}
    metrics: dict[str, Any] = {
        "slowest_rank": slowest.rank,
        "slowest_host": slowest.host,
        "slowest_rank_excess": slowest.excess,
        "slowest_rank_own_ms": 1000 * slowest.own_s,
        "others_median_own_ms": 1000 * slowest.others_median_s,
        "slowest_rank_data_bound": int(slowest.data_bound),
    }
    if all(t.measured for t in times):
        metrics["collective_wait_share"] = sum(t.collective_s for t in times) / (sum(t.step_s for t in times) or 1e-9)
    return metrics


class StragglerWatch:
    """Warns once when the same rank stays more than `threshold` slower than the others' median for
    `windows` metric windows in a row, and again only after it has recovered and fallen behind anew."""

    def __init__(self, threshold: float, windows: int) -> None:
        self.threshold = threshold
        self.windows = windows
        self.rank: int | None = None
        self.streak = 0
        self.warned = False

    def observe(self, step: int, slowest: Slowest | None) -> str | None:
        """The warning's text when this window completes a streak (also logged), else None."""
        if self.threshold <= 0 or slowest is None or slowest.excess <= self.threshold:
            self.rank, self.streak, self.warned = None, 0, False
            return None
        if slowest.rank != self.rank:
            self.rank, self.streak, self.warned = slowest.rank, 0, False
        self.streak += 1
        if self.streak < self.windows or self.warned:
            return None
        self.warned = True
        line = (
            f"step {step}: rank {slowest.rank} on {slowest.host} is a straggler: {100 * slowest.excess:.0f}% slower "
            f"than the other ranks' median ({1000 * slowest.own_s:.1f} vs {1000 * slowest.others_median_s:.1f} ms "
            f"of its own per step) for {self.streak} metric windows, {slowest.kind}"
            + (
                ": its loader keeps it waiting (a slow disk, link or decoding on that host)"
                if slowest.data_bound
                else ": its compute is slower (a slower or busier device or CPU on that host)"
            )
            + "; every rank runs at its pace"
        )
        log.warning("%s", line)
        return line


class RankWatch:
    """Per-rank timing of a run: the hosts (gathered once), then at every metric line every rank's
    times, the slowest rank's metrics, and rank 0's straggler warning. Collective: every rank calls
    each method at the same point."""

    def __init__(
        self, rank: int, world_size: int, group: dist.ProcessGroup | None, threshold: float, windows: int
    ) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.hosts = [str(host) for host in gather_objects(socket.gethostname(), group, world_size)]
        self.watch = StragglerWatch(threshold, windows)

    def window_metrics(self, step: int, mine: RankTimes) -> dict[str, Any]:
        """The metric line's share about ranks (empty for one process); warns on rank 0."""
        times = gather_rank_times(mine, self.group, self.world_size)
        slowest = slowest_rank(times, self.hosts)
        if self.rank == 0:
            self.watch.observe(step, slowest)
        return straggler_metrics(slowest, times)
