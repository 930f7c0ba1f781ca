"""Which rank is slow (dcgan.distributed.stragglers): the rules on given times, then a real run on two emulated hosts
whose second host runs under a CPU quota, as a rank on a throttled or oversubscribed node does."""

from __future__ import annotations

import math

import pytest
import torch

from dcgan.distributed.stragglers import RankTimes, StragglerWatch, slowest_rank, straggler_metrics
from dcgan.gan.step import STAT_NAMES

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


def test_a_window_counts_collective_waits_of_training_only() -> None:
    """The collective clock's time inside `outside_training` (an evaluation's exchanges) is not a step's."""
    from dcgan.distributed.collectives import COLLECTIVE_CLOCK
    from dcgan.train.window import Window

    now = [100.0]
    window = Window(torch.device("cpu"), clock=lambda: now[0])
    for _ in range(4):  # four steps of 0.1 s, 0.03 s of each blocked in collectives
        now[0] += 0.1
        COLLECTIVE_CLOCK.seconds += 0.03
        window.add(torch.zeros(len(STAT_NAMES)), data_wait_s=0.01)
    with window.outside_training():  # 2 s of evaluation, 1 s of it in collectives
        now[0] += 2.0
        COLLECTIVE_CLOCK.seconds += 1.0
    times = window.rank_times()
    assert times.step_s == pytest.approx(0.1) and times.data_wait_s == pytest.approx(0.01)
    assert times.collective_s == pytest.approx(0.03) and times.own_s == pytest.approx(0.07)
    assert math.isnan(Window(torch.device("meta")).rank_times().collective_s)  # not a host-blocking device
