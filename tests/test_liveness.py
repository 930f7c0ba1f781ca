"""The heartbeat's verdicts in one process: real TCPStore server and clients, one Liveness per rank,
verdicts collected instead of ending the process (the multi-host tests end real processes)."""

from __future__ import annotations

import datetime
import socket
import time

import torch.distributed as dist

from distributed_helpers import free_port
from dcgan.errors import ShardError
from dcgan.liveness import Liveness, StoreAddress

LIVENESS_S = 2.0


def store_server() -> tuple[dist.TCPStore, StoreAddress]:
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=10))
    return server, StoreAddress("127.0.0.1", port)


def ranks(address: StoreAddress, world: int, verdicts: dict[int, str], liveness_s: float = LIVENESS_S) -> list[Liveness]:
    def collect(rank: int):
        return lambda line: verdicts.setdefault(rank, line)

    return [Liveness(address, rank, world, liveness_s, on_verdict=collect(rank)).start() for rank in range(world)]


def wait_for_verdicts(verdicts: dict[int, str], count: int, timeout: float) -> float:
    started = time.monotonic()
    while len(verdicts) < count and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_rank_that_fails_is_named_with_its_own_error_by_every_other_rank_at_once() -> None:
    server, address = store_server()
    verdicts: dict[int, str] = {}
    alive = ranks(address, 3, verdicts, liveness_s=10)
    time.sleep(1.5)
    alive[2].stop(ShardError("shard /data/x-000003.tar: truncated"))
    waited = wait_for_verdicts(verdicts, 2, 12)
    host = socket.gethostname()
    expected = (f"rank 2 on {host} failed: shard /data/x-000003.tar: truncated. Completed checkpoints are kept: "
                "start the job again to resume")
    assert verdicts == {0: expected, 1: expected}
    assert waited < 4  # within beats (rank 0 lingers 2 s for rank 1 to read it), not after 10 s of silence
    for rank in alive[:2]:
        rank.stop()
    del server


def test_ranks_that_finish_are_not_lost_and_a_silent_one_is() -> None:
    server, address = store_server()
    verdicts: dict[int, str] = {}
    alive = ranks(address, 3, verdicts)
    time.sleep(1.5)
    alive[1].stop()  # finished normally: never a verdict
    alive[2]._stopped.set()  # beats stop without a word, as in a killed process
    waited = wait_for_verdicts(verdicts, 1, 4 * LIVENESS_S)
    assert list(verdicts) == [0]
    assert verdicts[0].startswith(f"lost rank 2 on {socket.gethostname()}: no heartbeat for 2 s (dist.liveness_s=2)")
    assert LIVENESS_S - 1.5 <= waited < LIVENESS_S + 2.5  # the last beat was seen up to a beat before the stop
    alive[0].stop()
    del server


def test_a_rank_that_cannot_reach_the_store_says_it_is_cut_off() -> None:
    server, address = store_server()
    verdicts: dict[int, str] = {}
    alive = ranks(address, 2, verdicts)
    time.sleep(1.5)
    del server  # rank 0's side is gone, store and all
    waited = wait_for_verdicts(verdicts, 2, 3 * LIVENESS_S)
    for rank in (0, 1):
        assert verdicts[rank].startswith(
            f"rank {rank} on {socket.gethostname()} lost contact with rank 0's rendezvous store at {address} for 2 s")
    assert waited < LIVENESS_S + 2.5
    for rank in alive:
        rank.stop()
