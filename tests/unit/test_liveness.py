"""The heartbeat's verdicts in one process: a real TCPStore server and clients, one Liveness per rank,
verdicts collected instead of ending the process (tests/multihost/test_torchrun_hosts.py ends real processes)."""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from distributed_helpers import free_port

from dcgan.distributed.liveness import Liveness
from dcgan.distributed.store import StoreAddress
from dcgan.errors import ShardError

LIVENESS_S = 3.0
"""The smallest `dist.liveness_s` the config accepts."""


@contextmanager
def ranks(
    world: int, verdicts: dict[int, str], liveness_s: float = LIVENESS_S
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

    beats = [Liveness(address, rank, world, liveness_s, on_verdict=collect(rank)).start() for rank in range(world)]
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
