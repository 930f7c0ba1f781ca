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


def cpu_quota_group(name: str) -> Path | None:
    """A cgroup whose processes get CPU_QUOTA of a CPU (cgroup v2, or v1's cpu controller), or None
    where this machine has neither writable."""
    period_us = 10_000
    quota_us = int(CPU_QUOTA * period_us)
    for root, marker, files in (
        (Path("/sys/fs/cgroup"), "cgroup.controllers", {"cpu.max": f"{quota_us} {period_us}"}),
        (
            Path("/sys/fs/cgroup/cpu"),
            "cpu.cfs_quota_us",
            {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota_us)},
        ),
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


@contextmanager
def throttled(name: str) -> Iterator[Path]:
    """A cgroup of CPU_QUOTA, removed afterwards (with those of earlier test runs that a kill left)."""
    for parent in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")):
        for stale in parent.glob("dcgan-test-*") if parent.is_dir() else []:
            with suppress(OSError):
                stale.rmdir()  # only empty ones go: their processes are gone
    group = cpu_quota_group(name)
    if group is None:
        pytest.skip("no writable cgroup cpu controller (cpu.max or cpu.cfs_quota_us) to throttle a host with")
    try:
        yield group
    finally:
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
    """hostb's processes get 30% of a CPU (a cgroup quota): rank 1 on hostb is named as the straggler,
    compute-bound, in rank 0's warning, in stats.jsonl and in `dcgan report`."""
    run = tmp_path / "run"
    settings = ("train.steps=150", "log.every=10", "checkpoint.every=1000", "sample.every=1000")
    with throttled(f"dcgan-test-{os.getpid()}") as group, emulated_hosts(["hosta", "hostb"], tmp_path / "net") as hosts:
        launch = torchrun_on(hosts, ["hosta", "hostb"], 1, run, *settings, "log.straggler=0.3", tag="slow")
        # throttled once it trains (throttled from its start, its imports alone would outlast the heartbeat's
        # arrival rule): the host gets busy, as a node does when another job lands on it
        wait_for(lambda: bool(stats_rows(run / "stats.jsonl")), 120, "the first metric line")
        workers = worker_pids(hosts, "hostb")
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


CPU_QUOTA = 0.3
"""hostb's share of one CPU: its rank computes about 3x slower than hosta's."""
