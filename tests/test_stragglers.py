"""Which rank is slow (dcgan.distributed.stragglers): the rules on given times, then a real run on two emulated hosts
whose second host runs under a CPU quota, as a rank on a throttled or oversubscribed node does."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_ranks
from helpers import read_stats, run_in_process
from hosts import emulated_hosts, missing_requirements
from test_multihost import torchrun_on, wait_for, worker_pids

from dcgan.distributed.stragglers import RankTimes, StragglerWatch, slowest_rank, straggler_metrics
from dcgan.run.stats import read_stats as stats_rows

HOSTS = ["hosta", "hostb", "hostc"]


def test_the_slowest_rank_is_the_one_that_waits_least_in_collectives_not_the_one_with_the_longest_step() -> None:
    """Every rank's step takes 100 ms (synchronous); rank 2 waits 10 ms for the others, they wait 60 ms."""
    times = [RankTimes(0.100, 0.002, 0.060), RankTimes(0.100, 0.002, 0.058), RankTimes(0.100, 0.002, 0.010)]
    slowest = slowest_rank(times, HOSTS)
    assert slowest is not None
    assert (slowest.rank, slowest.host, slowest.kind) == (2, "hostc", "compute-bound")
    assert slowest.own_s == pytest.approx(0.090)
    assert slowest.others_median_s == pytest.approx(0.041)  # the median of the OTHER ranks: 40 and 42 ms
    assert slowest.excess == pytest.approx(0.090 / 0.041 - 1)


def test_a_rank_whose_excess_is_its_data_wait_is_data_bound() -> None:
    times = [RankTimes(0.100, 0.001, 0.070), RankTimes(0.100, 0.045, 0.005)]
    slowest = slowest_rank(times, HOSTS[:2])
    assert slowest is not None and (slowest.rank, slowest.kind) == (1, "data-bound")
    assert slowest_rank([RankTimes(0.1, 0.0, 0.0)], HOSTS[:1]) is None  # one rank: nobody to compare with


def test_where_the_collective_wait_is_not_measured_the_rank_with_the_longest_data_wait_is_named() -> None:
    """NCCL: the host clock cannot see the collectives (NaN); every rank's step is 100 ms, rank 1 waits
    30 ms for its data, the others 2 ms: rank 1 is the data-bound straggler; no collective share."""
    nan = float("nan")
    times = [RankTimes(0.100, 0.002, nan), RankTimes(0.100, 0.030, nan), RankTimes(0.100, 0.002, nan)]
    slowest = slowest_rank(times, HOSTS)
    assert slowest is not None and (slowest.rank, slowest.kind) == (1, "data-bound")
    assert slowest.own_s == pytest.approx(0.100) and slowest.others_median_s == pytest.approx(0.072)
    metrics = straggler_metrics(slowest, times)
    assert metrics["slowest_host"] == "hostb" and "collective_wait_share" not in metrics
    even = [RankTimes(0.100, 0.002, nan)] * 3
    assert slowest_rank(even, HOSTS).excess == pytest.approx(0.0)  # type: ignore[union-attr]


def test_the_warning_needs_the_same_rank_over_the_threshold_for_the_given_windows_and_comes_once() -> None:
    watch = StragglerWatch(threshold=0.5, windows=3)
    slow = [RankTimes(0.1, 0.0, 0.06), RankTimes(0.1, 0.0, 0.0)]  # rank 1: 100 ms own vs 40 ms: +150%
    other = [RankTimes(0.1, 0.0, 0.0), RankTimes(0.1, 0.0, 0.06)]  # now rank 0
    even = [RankTimes(0.1, 0.0, 0.03), RankTimes(0.1, 0.0, 0.03)]

    def observe(step: int, times: list[RankTimes]) -> str | None:
        return watch.observe(step, slowest_rank(times, HOSTS[:2]))

    assert [observe(1, slow), observe(2, other), observe(3, slow), observe(4, slow)] == [None] * 4
    line = observe(5, slow)  # the third window in a row of rank 1
    assert line is not None and line.startswith(
        "step 5: rank 1 on hostb is a straggler: 150% slower than the other ranks' median (100.0 vs 40.0 ms"
    )
    assert "for 3 metric windows, compute-bound" in line
    assert observe(6, slow) is None  # once per episode
    assert observe(7, even) is None
    assert [observe(8, slow), observe(9, slow)] == [None, None]
    assert observe(10, slow) is not None  # fell behind anew: warned anew
    assert StragglerWatch(threshold=0, windows=1).observe(1, slowest_rank(slow, HOSTS[:2])) is None  # off


# --- a real straggler --------------------------------------------------------------------------------

CPU_QUOTA = 0.3
"""hostb's share of one CPU: its rank computes about 3x slower than hosta's."""


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


def _gradients_with_and_without_the_timed_hook(rank: int, world: int, out: Path) -> None:
    """D's gradients on this rank's slice of one batch: through prepare_module's DDP (the timed hook on
    CPU), and through a DDP of the same weights with DDP's own all-reduce; the collective clock's reading."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dcgan.config import ModelConfig
    from dcgan.distributed.collectives import COLLECTIVE_CLOCK
    from dcgan.distributed.parallelize import prepare_module
    from dcgan.distributed.session import destroy_distributed, init_distributed
    from dcgan.gan.models import Discriminator

    info = init_distributed("cpu", 60, liveness_s=0)
    try:
        model = ModelConfig(resolution=16, channels=1, nz=8, ngf=8, ndf=8)
        torch.manual_seed(0)
        images = torch.randn(4 * world, 1, 16, 16)[rank * 4 : (rank + 1) * 4]
        hooked, bare = prepare_module(Discriminator(model), info, compile=False, channels_last=False, sync_bn=False)
        plain_module = Discriminator(model)
        plain_module.load_state_dict(bare.state_dict())
        plain = DDP(plain_module, broadcast_buffers=False)
        waited = COLLECTIVE_CLOCK.seconds
        hooked(images).sum().backward()
        waited = COLLECTIVE_CLOCK.seconds - waited
        plain(images).sum().backward()
        torch.save(
            {
                "hooked": [p.grad for p in bare.parameters()],
                "plain": [p.grad for p in plain_module.parameters()],
                "waited": waited,
            },
            out / f"rank{rank}.pt",
        )
    finally:
        destroy_distributed()


@pytest.mark.slow  # gloo processes
@pytest.mark.parametrize("world", [2, 3])
def test_the_timed_gradient_all_reduce_gives_ddps_gradients_and_counts_its_wait(world: int, tmp_path: Path) -> None:
    """The hook that times DDP's all-reduce on CPU changes no gradient: equal to DDP's own to float32
    rounding (bit for bit at 2 ranks; at 3 the hook divides before summing, DDP after), on every rank."""
    spawn_ranks(_gradients_with_and_without_the_timed_hook, world, world, tmp_path)
    for rank in range(world):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        for hooked, plain in zip(found["hooked"], found["plain"], strict=True):
            if world == 2:
                assert torch.equal(hooked, plain)
            else:
                torch.testing.assert_close(hooked, plain, rtol=1e-6, atol=1e-7)
        assert found["waited"] > 0


def test_a_window_counts_collective_waits_of_training_only() -> None:
    """The collective clock's time inside `outside_training` (an evaluation's exchanges) is not a step's."""
    from dcgan.distributed.collectives import COLLECTIVE_CLOCK
    from dcgan.train.window import Window

    now = [100.0]
    window = Window(torch.device("cpu"), clock=lambda: now[0])
    for _ in range(4):  # four steps of 0.1 s, 0.03 s of each blocked in collectives
        now[0] += 0.1
        COLLECTIVE_CLOCK.seconds += 0.03
        window.add(torch.zeros(8), data_wait_s=0.01)
    with window.outside_training():  # 2 s of evaluation, 1 s of it in collectives
        now[0] += 2.0
        COLLECTIVE_CLOCK.seconds += 1.0
    times = window.rank_times()
    assert times.step_s == pytest.approx(0.1) and times.data_wait_s == pytest.approx(0.01)
    assert times.collective_s == pytest.approx(0.03) and times.own_s == pytest.approx(0.07)
    assert math.isnan(Window(torch.device("meta")).rank_times().collective_s)  # not a host-blocking device
