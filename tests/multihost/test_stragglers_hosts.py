"""Which rank is slow, for real: a rank on a host whose CPU is throttled (a cgroup quota) is named with
its host in the warning, stats.jsonl and the report."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from helpers import read_stats, run_in_process
from hosts import emulated_hosts, missing_requirements, torchrun_on, wait_for, worker_pids

from dcgan.run.stats import read_stats as stats_rows

log = logging.getLogger(__name__)


def cpu_group(name: str, v2: dict[str, str], v1: dict[str, str]) -> Path | None:
    """A cgroup with these cpu settings (cgroup v2's files, or v1's cpu controller's), or None where this
    machine has neither writable."""
    for root, marker, files in (
        (Path("/sys/fs/cgroup"), "cgroup.controllers", v2),
        (Path("/sys/fs/cgroup/cpu"), "cpu.cfs_quota_us", v1),
    ):
        if not (root / marker).exists():  # not a cgroup v2 root, or no v1 cpu controller there
            continue
        group = root / name
        try:
            group.mkdir(exist_ok=True)
            for file, value in files.items():
                (group / file).write_text(value)
            return group
        except OSError:
            with suppress(OSError):
                group.rmdir()
    return None


PERIOD_US = 10_000


@contextmanager
def cpu_groups(name: str) -> Iterator[tuple[Path, Path]]:
    """Two cgroups, removed afterwards (with those of earlier test runs that a kill left): `slow`, whose
    processes get CPU_QUOTA of a CPU, and `dedicated`, whose processes win the CPU from every other
    process of the machine (the largest cpu weight). Hosts A and B are nodes of a cluster: B gets busy
    as a node does when another job lands on it, while A must run as a node of its own, whatever else
    this machine runs at the time (the other tests of a parallel suite)."""
    for parent in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")):
        for stale in parent.glob("dcgan-test-*") if parent.is_dir() else []:
            with suppress(OSError):
                stale.rmdir()  # only empty ones go: their processes are gone
    quota_us = int(CPU_QUOTA * PERIOD_US)
    slow = cpu_group(
        f"{name}-slow",
        {"cpu.max": f"{quota_us} {PERIOD_US}"},
        {"cpu.cfs_period_us": str(PERIOD_US), "cpu.cfs_quota_us": str(quota_us)},
    )
    dedicated = cpu_group(f"{name}-dedicated", {"cpu.weight": "10000"}, {"cpu.shares": "262144"})
    groups = [group for group in (slow, dedicated) if group is not None]
    try:
        if slow is None or dedicated is None:
            pytest.skip("no writable cgroup cpu controller (cpu.max/cpu.weight or cpu.cfs_quota_us/cpu.shares)")
        yield slow, dedicated
    finally:
        for group in groups:
            for pid in (group / "cgroup.procs").read_text().split():  # any process left: back to the top group
                with suppress(OSError):
                    (group.parent / "cgroup.procs").write_text(pid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
def test_a_rank_on_a_throttled_host_is_named_with_its_host_in_the_warning_stats_and_report(tmp_path: Path) -> None:
    """hostb's processes get 15% of a CPU (a cgroup quota) while hosta's run as on a node of their own:
    rank 1 on hostb is named as the straggler, compute-bound, in rank 0's warning, in stats.jsonl and in
    `dcgan report`."""
    run = tmp_path / "run"
    settings = ("train.steps=150", "log.every=10", "checkpoint.every=1000", "sample.every=1000")
    with (
        cpu_groups(f"dcgan-test-{os.getpid()}") as (slow, dedicated),
        emulated_hosts(["hosta", "hostb"], tmp_path / "net") as hosts,
    ):
        launch = torchrun_on(hosts, ["hosta", "hostb"], 1, run, *settings, "log.straggler=0.3", tag="slow")
        # throttled once it trains (throttled from its start, its imports alone would outlast the heartbeat's
        # arrival rule): the host gets busy, as a node does when another job lands on it
        wait_for(lambda: bool(stats_rows(run / "stats.jsonl")), 120, "the first metric line")
        for host, group in (("hosta", dedicated), ("hostb", slow)):
            workers = worker_pids(hosts, host)
            assert len(workers) == 1
            (group / "cgroup.procs").write_text(str(workers[0]))
        throttled_from = max(row["step"] for row in stats_rows(run / "stats.jsonl"))
        assert {name: status for name, (status, _) in launch.wait(180).items()} == {"hosta": 0, "hostb": 0}, launch.log(
            "hosta"
        )[-3000:]
        assert not worker_pids(hosts, "hostb")
    train_log = (run / "train.log").read_text()
    warnings = [line for line in train_log.splitlines() if "is a straggler" in line]
    assert warnings, train_log[-3000:]
    assert "rank 1 on hostb is a straggler" in warnings[0] and "compute-bound" in warnings[0]
    rows = [row for row in read_stats(run) if row["step"] > throttled_from + 10]  # a whole window throttled
    named = [row for row in rows if (row["slowest_rank"], row["slowest_host"]) == (1, "hostb")]
    assert len(named) >= len(rows) - 1, [(r["slowest_rank"], round(r["slowest_rank_excess"], 2)) for r in rows]
    excess = sorted(row["slowest_rank_excess"] for row in named)
    assert excess[len(excess) // 2] > 0.3, excess  # the median window: hostb at least 30% slower
    page = run_in_process("report", str(run)).stdout
    report = (run / "report.html").read_text()
    assert "report.html" in page
    assert "rank 1 on hostb" in report and "slowest in" in report


CPU_QUOTA = 0.15
"""hostb's share of one CPU: its rank computes several times slower than hosta's, by a margin that other
load on the machine (a parallel suite) cannot close."""
