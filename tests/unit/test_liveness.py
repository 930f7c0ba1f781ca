"""The heartbeat's verdicts in one process: a real TCPStore server and clients, one Liveness per rank,
verdicts collected instead of ending the process (tests/multihost/test_torchrun_hosts.py ends real processes).
With `per_host`, consecutive ranks play the ranks of one host: only the first of each beats."""

from __future__ import annotations

import datetime
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch.distributed as dist
from distributed_helpers import free_port

from dcgan.distributed import verdicts
from dcgan.distributed.liveness import Liveness
from dcgan.distributed.store import StoreAddress
from dcgan.distributed.verdicts import MIN_BEATS, STORE_BUDGET_PER_S, WATCH_EVERY, Judge, Timing, beat_interval_s
from dcgan.errors import ShardError

LIVENESS_S = 3.0
"""The smallest `dist.liveness_s` the config accepts."""


@contextmanager
def ranks(
    world: int, verdicts: dict[int, str], liveness_s: float = LIVENESS_S, per_host: int = 1
) -> Iterator[tuple[list[dist.TCPStore], list[Liveness]]]:
    """A store server (rank 0's side; clear the list to end it) and `world` heartbeats on it, all stopped
    afterwards."""
    port = free_port()
    server = [
        dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=10))
    ]
    address = StoreAddress("127.0.0.1", port)

    def collect(rank: int):
        return lambda line: verdicts.setdefault(rank, line)

    beats = [
        Liveness(address, rank, world, liveness_s, on_verdict=collect(rank), per_host=per_host).start()
        for rank in range(world)
    ]
    try:
        yield server, beats
    finally:
        for beat in beats:
            beat._stopped.set()


def wait_for_verdicts(verdicts: dict[int, str], count: int, timeout: float) -> float:
    started = time.monotonic()
    while len(verdicts) < count and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_rank_that_fails_is_named_with_its_own_error_by_every_other_rank_at_once() -> None:
    verdicts: dict[int, str] = {}
    with ranks(3, verdicts, liveness_s=10) as (_, beats):
        time.sleep(1.5)
        beats[2].stop(ShardError("shard /data/x-000003.tar: truncated"))
        waited = wait_for_verdicts(verdicts, 2, 12)
    expected = (
        f"rank 2 on {socket.gethostname()} failed: shard /data/x-000003.tar: truncated. Completed "
        "checkpoints are kept: start the job again to resume"
    )
    assert verdicts == {0: expected, 1: expected}
    assert waited < 6  # within beats (rank 0 lingers 2 s for rank 1 to read it), not after 10 s of silence


def test_a_rank_ending_on_its_own_error_ignores_peers_that_fail_with_the_same_one() -> None:
    """Every rank raises the same error (a busy run.dir, no progress): each keeps its own line and status."""
    verdicts: dict[int, str] = {}
    with ranks(2, verdicts, liveness_s=10) as (_, beats):
        time.sleep(1.5)
        beats[0].ending()
        beats[1].stop(ShardError("the same error on every rank"))
        time.sleep(3)
    assert verdicts == {}


def test_ranks_that_finish_are_not_lost_and_a_silent_one_is() -> None:
    verdicts: dict[int, str] = {}
    with ranks(3, verdicts) as (_, beats):
        time.sleep(1.5)
        beats[1].stop()  # finished normally: never a verdict
        beats[2]._stopped.set()  # its beats stop without a word, as a killed process's do
        waited = wait_for_verdicts(verdicts, 1, 4 * LIVENESS_S)
    assert list(verdicts) == [0]
    assert verdicts[0].startswith(f"lost rank 2 on {socket.gethostname()}: no heartbeat for 3 s (dist.liveness_s=3)")
    assert LIVENESS_S - 1.5 <= waited < LIVENESS_S + 3  # the last beat was seen up to a beat before the stop


def test_a_rank_that_cannot_reach_the_store_says_it_is_cut_off() -> None:
    verdicts: dict[int, str] = {}
    with ranks(2, verdicts) as (server, beats):
        time.sleep(1.5)
        address = beats[0].address
        server.clear()  # rank 0's side is gone, store and all
        waited = wait_for_verdicts(verdicts, 2, 4 * LIVENESS_S)
    for rank in (0, 1):
        assert verdicts[rank].startswith(
            f"rank {rank} on {socket.gethostname()} lost contact with rank 0's rendezvous store at {address} for 3 s"
        )
    assert waited < LIVENESS_S + 3


def test_a_silent_host_is_named_with_its_ranks_and_its_other_ranks_hear_the_verdict_without_a_request() -> None:
    """3 hosts of 2 ranks: host 2's beater goes silent; every surviving rank, the non-beaters (1 and 3)
    included, gets one line naming ranks 4-5, and the ranks that do not beat sent no request at all."""
    verdicts: dict[int, str] = {}
    with ranks(6, verdicts, per_host=2) as (_, beats):
        time.sleep(1.5)
        beats[4]._stopped.set()  # host 2's beater: silent, as when the host is lost
        beats[5]._stopped.set()
        wait_for_verdicts(verdicts, 4, 4 * LIVENESS_S)
        assert all(beats[rank]._store is None for rank in (1, 3, 5))
    assert sorted(verdicts) == [0, 1, 2, 3]
    assert len(set(verdicts.values())) == 1
    assert verdicts[0].startswith(f"lost ranks 4-5 on {socket.gethostname()}: no heartbeat for 3 s")


def test_a_rank_that_does_not_beat_is_named_with_its_error_at_once() -> None:
    verdicts: dict[int, str] = {}
    with ranks(4, verdicts, liveness_s=10, per_host=2) as (_, beats):
        time.sleep(1.5)
        beats[3].stop(ShardError("shard x: truncated"))
        waited = wait_for_verdicts(verdicts, 3, 12)
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert verdicts[0].startswith(f"rank 3 on {socket.gethostname()} failed: shard x: truncated.")
    assert waited < 6


def test_the_heartbeat_sends_about_one_request_a_second_per_host_and_rank_0_reports_it(caplog) -> None:
    """4 hosts of 4 ranks for 6 s (6 beats, give or take one): rank 0 two requests a beat, the other beaters 1 + 1/WATCH_EVERY; at the
    end rank 0 logs the sum (the control-plane cost a user can read in train.log)."""
    verdicts: dict[int, str] = {}
    with ranks(16, verdicts, liveness_s=10, per_host=4) as (_, beats):
        time.sleep(1.5)  # connected, the keys made: from here on only beats
        before = {rank: beats[rank]._store.requests for rank in (0, 4, 8, 12)}
        time.sleep(6)
        rates = {rank: (beats[rank]._store.requests - before[rank]) / 6 for rank in (0, 4, 8, 12)}
        for rank in range(15, 0, -1):
            beats[rank].stop()
        with caplog.at_level(logging.INFO, logger="dcgan.distributed.liveness"):
            beats[0].stop()
    assert verdicts == {}
    assert 1.6 <= rates[0] <= 2.4, rates
    assert all(1.0 <= rates[rank] <= 1.7 for rank in (4, 8, 12)), rates
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("control plane:")]
    assert re.match(r"control plane: the heartbeat of 16 rank\(s\) on 4 host\(s\) sent \d+ store requests", line), line
    assert "4 connection(s)" in line


def test_the_clocks_grow_by_rule_with_the_hosts_and_with_their_load() -> None:
    """The beat slows only where the store's budget needs it, the patience holds MIN_BEATS beats, and the
    arrival slack follows this rank's own start-up (a loaded host starts its ranks far apart)."""
    assert Timing.for_job(15, hosts=4, started_s=2) == Timing(liveness_s=15, beat_s=1.0, arrival_slack_s=5.0)
    assert Timing.for_job(15, hosts=4, started_s=70).arrival_slack_s == 70
    assert beat_interval_s(512) == 1.0  # 4,096 GPUs of 8-GPU nodes beat once a second
    for hosts in (1024, 8192):
        timing = Timing.for_job(15, hosts, 0)
        assert timing.beat_s > 1.0
        assert (2 + (hosts - 1) * (1 + 1 / WATCH_EVERY)) / timing.beat_s == pytest.approx(STORE_BUDGET_PER_S)
        assert timing.liveness_s == max(15, MIN_BEATS * timing.beat_s)


def test_a_host_not_yet_seen_is_lost_one_arrival_window_after_the_latest_host_arrived(monkeypatch) -> None:
    """Start-up comes in waves on a loaded machine (CI: 28 ranks beside a parallel suite): while hosts
    still arrive, the last one is not given up; once they stop, it is lost one window later. The rule
    is read on a clock the test sets, so that the machine's load cannot move it."""
    clock = [100.0]
    monkeypatch.setattr(verdicts.time, "monotonic", lambda: clock[0])
    judge = Judge(3, Timing(liveness_s=15, beat_s=1, arrival_slack_s=5))  # an arrival window of 20 s

    def at(t: float, counts: list[int]) -> list[int]:
        clock[0] = 100.0 + t
        return judge.update(counts, suspect=False)

    assert at(10, [1, 0, 0]) == []
    assert at(19, [9, 0, 0]) == []
    assert at(25, [15, 1, 0]) == [], "host 1 came late, after host 2's window from the start had passed"
    assert at(44, [34, 20, 0]) == [], "host 2's window now counts from host 1's arrival at 25 s"
    assert at(46, [36, 22, 0]) == [2]
    assert judge.silent_s(2) == 46, "the line still says how long since the job began"
    assert at(46, [36, 22, 0]) == [2] and at(100, [-1, -1, 0]) == [2], "ended hosts are never lost"


def test_a_process_knows_how_long_ago_it_started() -> None:
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", "from dcgan.distributed.verdicts import process_age_s; print(process_age_s())"],
        capture_output=True,
        text=True,
        check=True,
    )
    took = time.monotonic() - started
    assert 0.05 < float(child.stdout) < took + 0.1  # the child's imports, at most its whole life
