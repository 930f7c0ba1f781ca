"""The heartbeat's rules (dcgan.distributed.liveness), apart from its threads and its store: which host
is lost after how long, and the one line that names it.

A host, not a rank, is what beats: torchrun's agent already watches the ranks of its host (one that dies
ends the others), so a host's first rank beats for all of them. The store's load then grows with the
hosts, not the GPUs: a 1,024-GPU job of 8-GPU nodes sends ~170 requests a second, not ~3,000.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dcgan.distributed.store import StoreAddress

log = logging.getLogger(__name__)

BEAT_INTERVAL_S = 1.0
"""A host's beat, up to STORE_BUDGET_PER_S: the shortest that the rules below can wait three of."""
STORE_BUDGET_PER_S = 1000.0
"""Heartbeat requests a second the whole job may send to one store. One beat costs 2 requests on rank
0's host and 4/3 on any other (WATCH_EVERY), so beats stay at 1 s up to ~750 hosts (6,000 GPUs on 8-GPU
nodes); a larger job beats more slowly (`beat_interval_s`). Measured: a libuv TCPStore answers ~700
heartbeat requests a second with a p99 under 10 ms (docs/performance.md, benchmarks/control_plane.py)."""
MIN_BEATS = 3
"""Beats a host may miss before it is lost: `dist.liveness_s` grows to this many intervals if needed."""
ARRIVAL_SLACK_S = 5.0
"""Extra time a host gets for its first beat, at least: ranks start together (torchrun's rendezvous or
srun is complete when they are spawned), so only the difference in their start-up (imports) adds to the
rule, and that difference grows with the host's load (`Timing.for_job`)."""
SUSPECT_PATIENCE_S = 4.0
"""How long rank 0 waits for a missing beat once a collective has failed somewhere, at least: three
beats, as a beat is seen up to one interval late (it grows with the beat: `Timing.suspect_s`)."""
WATCH_EVERY = 3
"""A host other than rank 0's reads rank 0's beat every this many beats: rank 0's process gone while the
store lives (the agent hosts it) is rare, and `liveness_s` (>= 3 s) leaves time; a third of the requests."""

ENDED = -1
"""A beat count that says: this host's beater ended (finished or failed: failures travel in a list of
their own); it will not beat again, and is not lost."""
VERDICT_MARK = 1 << 40
"""Added to a listening host's beat count with the verdict: its next beat returns a count this large and
so learns of the verdict in the request it sends anyway (no request a second to poll for it)."""


def beat_interval_s(hosts: int) -> float:
    """A host's beat interval: 1 s, or longer where `hosts` beating once a second would send the store
    more than STORE_BUDGET_PER_S requests (a job of more than ~750 hosts)."""
    per_beat = 2 + (hosts - 1) * (1 + 1 / WATCH_EVERY)
    return max(BEAT_INTERVAL_S, per_beat / STORE_BUDGET_PER_S)


def process_age_s() -> float:
    """Seconds since this process began (Linux's /proc; 0 elsewhere, where the fixed slack applies)."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass(frozen=True)
class Timing:
    """The heartbeat's clocks for one job. Two grow, by rule, where a fixed value would raise false
    alarms: the beat interval with the number of hosts (the store's budget), and the arrival slack with
    the load on the hosts, read from this rank's own start-up: ranks spawned together on equally loaded
    hosts finish their imports apart by up to about as long as the imports took (32 processes on 2
    cores: 60-80 s), and the patience for a silent host with the beat interval (MIN_BEATS)."""

    liveness_s: float
    beat_s: float
    arrival_slack_s: float

    @property
    def suspect_s(self) -> float:
        """Rank 0's patience once a collective failed: MIN_BEATS + 1 beats, at least SUSPECT_PATIENCE_S."""
        return max(SUSPECT_PATIENCE_S, (MIN_BEATS + 1) * self.beat_s)

    @classmethod
    def for_job(cls, liveness_s: float, hosts: int, started_s: float) -> Timing:
        beat_s = beat_interval_s(hosts)
        return cls(max(liveness_s, MIN_BEATS * beat_s), beat_s, max(ARRIVAL_SLACK_S, started_s))


@dataclass(frozen=True)
class Hosts:
    """Which ranks share a host: launchers number the ranks of a host consecutively (torchrun's ranks of
    node n are n x LOCAL_WORLD_SIZE onwards; srun's block distribution too)."""

    world_size: int
    per_host: int

    @property
    def count(self) -> int:
        return math.ceil(self.world_size / self.per_host)

    def of(self, rank: int) -> int:
        return rank // self.per_host

    def beats_for_its_host(self, rank: int) -> bool:
        return rank % self.per_host == 0

    def ranks(self, host: int) -> str:
        """`rank 5` or `ranks 8-11`: the ranks of `host`, as the lines name them."""
        first = host * self.per_host
        last = min(first + self.per_host, self.world_size) - 1
        return f"rank {first}" if first == last else f"ranks {first}-{last}"


class Judge:
    """Rank 0's view of every host's beat count: who stood still for too long."""

    def __init__(self, hosts: int, timing: Timing) -> None:
        now = time.monotonic()
        self.liveness_s, self.arrival_slack_s = timing.liveness_s, timing.arrival_slack_s
        self.suspect_s = timing.suspect_s
        self.counts = [0] * hosts
        self.changed = [now] * hosts
        self.last_arrival = now

    def update(self, counts: list[int], *, suspect: bool) -> list[int]:
        """The lost hosts given the latest counts: silent past the patience (shorter once a collective
        failed somewhere; longer for a host not yet started). Ended hosts are never lost.

        A host that never beat is measured from the latest first beat of any host, not from the start:
        while hosts still arrive, start-up is under way (on loaded machines a wave of slow imports can
        outlast the slack), and a host that is really absent is named one arrival window after the last
        one came."""
        now = time.monotonic()
        for host, count in enumerate(counts):
            if count != self.counts[host]:
                if self.counts[host] == 0 and count > 0:
                    self.last_arrival = now
                self.counts[host], self.changed[host] = count, now
        patience = self.suspect_s if suspect else self.liveness_s
        arrival = max(self.liveness_s + self.arrival_slack_s, patience)

        def lost(host: int, count: int) -> bool:
            if count == ENDED:
                return False
            if count > 0:
                return now - self.changed[host] > patience
            return now - max(self.changed[host], self.last_arrival) > arrival

        return [host for host, count in enumerate(self.counts) if lost(host, count)]

    def forgive(self, now: float) -> None:
        """Restart every silence clock (this process was paused, and so, most likely, were the others)."""
        self.changed = [now] * len(self.changed)

    def listeners(self, lost: list[int]) -> list[int]:
        """Hosts other than rank 0's that are still beating: those that will read the verdict."""
        return [host for host, count in enumerate(self.counts) if host != 0 and host not in lost and count > 0]

    def running(self) -> list[int]:
        return [host for host, count in enumerate(self.counts) if count != ENDED]

    def silent_s(self, host: int) -> float:
        return time.monotonic() - self.changed[host]


class Watched:
    """A host's view of rank 0's beat count."""

    def __init__(self, timing: Timing) -> None:
        self.liveness_s, self.arrival_slack_s = timing.liveness_s, timing.arrival_slack_s
        self.count = 0
        self.changed = time.monotonic()

    def update(self, count: int) -> bool:
        """Whether rank 0 has stood still too long (the arrival rule until its first beat)."""
        now = time.monotonic()
        if count != self.count:
            self.count, self.changed = count, now
        patience = self.liveness_s if self.count > 0 else self.liveness_s + self.arrival_slack_s
        return now - self.changed > patience

    def forgive(self, now: float) -> None:
        self.changed = now

    def silent_s(self) -> float:
        return time.monotonic() - self.changed


def failed_ranks(listed: str) -> list[int]:
    """The ranks in the store's list of failures ("3,12,"), each once, in the order they failed."""
    ranks: list[int] = []
    for part in listed.split(","):
        if part.strip() and int(part) not in ranks:
            ranks.append(int(part))
    return ranks


RESUME = "Completed checkpoints are kept: start the job again to resume"


def lost_line(failed: list[tuple[str, str]], silent: list[str], quiet_s: float, liveness_s: float) -> str:
    """One line for everything lost: ranks that failed, with their own errors (`(who, error)`), then hosts
    that went silent (`who`: "ranks 8-11 on hostc")."""
    parts = [f"{who} failed: {error}" for who, error in failed]
    if silent:
        parts.append(
            f"lost {', '.join(silent)}: no heartbeat for {quiet_s:.0f} s (dist.liveness_s={liveness_s:g}): the host "
            "is down or cut off, or the process was killed"
        )
    return "; ".join(parts) + f". {RESUME}"


def local_verdict_file(prefix: str, address: StoreAddress, host: int) -> Path:
    """Where a host's beater leaves a verdict for the host's other ranks: on the host's own disk (the
    temporary directory), named by the store, the round and the host, so that no other job reads it."""
    name = f"{address.host}-{prefix.replace('/', '-')}-host{host}"
    return Path(tempfile.gettempdir()) / name


def write_verdict_file(path: Path, line: str) -> None:
    try:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(line)
        temporary.replace(path)
    except OSError as exc:  # the host's other ranks end when torchrun's agent sees this one end
        log.warning("could not leave the verdict for this host's other ranks in %s: %s", path, exc)


def read_verdict_file(path: Path, since: float) -> str | None:
    """The verdict left by this host's beater, if one was written since this process started."""
    try:
        if path.stat().st_mtime >= since - 1.0:
            return path.read_text()
    except OSError:
        pass
    return None


def cost_line(costs: list[dict[str, float]], world_size: int, hosts: int) -> str:
    """What the heartbeat asked of the store over the run: requests per second in all, and per host."""
    total = sum(cost["requests"] for cost in costs)
    seconds = max((cost["seconds"] for cost in costs), default=0.0)
    rates = sorted(cost["requests"] / max(cost["seconds"], 1e-9) for cost in costs)
    per_host = f"{rates[len(rates) // 2]:.2f}/s median, {rates[-1]:.2f}/s most" if rates else "none reported"
    return (
        f"control plane: the heartbeat of {world_size} rank(s) on {hosts} host(s) sent {total:.0f} store "
        f"requests in {seconds:.0f} s ({total / max(seconds, 1e-9):.1f}/s at the store; per host {per_host}; "
        f"{len(costs)} connection(s))"
    )
