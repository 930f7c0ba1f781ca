"""The doctor's findings and how they are told: what each rank measured (RankReport), the verdict (a
rank or a pair of hosts far from the others, a check that failed), the table rank 0 prints, and the
JSON file. No measurement here: the rules are tested on given numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from dcgan.console import table
from dcgan.errors import EXIT_OK, EXIT_PREFLIGHT_BROKEN, EXIT_PREFLIGHT_FAR_OFF

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


@dataclass
class DataCheck:
    """What one rank found of the configured data: a line, and the loader's rate where measured."""

    note: str
    img_s: float | None = None


def ratios_to_median(values: list[float | None]) -> list[float | None]:
    """Each value over the median of the OTHER measured ones (None where not measured, or alone): a rank
    is not part of what it is compared with, so that with two ranks a rank half as fast reads 0.5x, not
    0.67x (the rule dcgan.distributed.stragglers follows in training)."""

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


def rank_table(reports: list[RankReport], verdict: Verdict) -> str:
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
    return table(rows, right=frozenset(range(10)) - {1, 2, 9})


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
    lines = [rank_table(reports, verdict)]
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


SMALL_ELEMENTS = 8
"""A small all-reduce's size: its time is the collective's latency."""
