"""The rendezvous store a launched job shares (MASTER_ADDR:MASTER_PORT): where the heartbeat and the
hang report talk, with keys prefixed per torchrun round so that a restarted round never reads the
previous round's beats.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch.distributed as dist

from dcgan.distributed.env import env_int, torchrun_round

T = TypeVar("T")


@dataclass(frozen=True)
class StoreAddress:
    """Where the rendezvous store listens: MASTER_ADDR and MASTER_PORT, as torchrun or srun export them."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def round_key_prefix(address: StoreAddress) -> str:
    """Keys of this round only, so that a new round never reads an old one's beats or verdict: torchrun's
    restart count (a restarted round may keep the agent's store), and the store's port (a round whose
    membership changed keeps the restart count, and torchrun picks a free port for each round's store)."""
    return f"dcgan/liveness/{torchrun_round()}/{address.port}"


def rendezvous_store() -> StoreAddress | None:
    """The rendezvous store of a launched job (MASTER_ADDR, MASTER_PORT), where the heartbeat and the
    hang report talk; None for a process that was not launched as a rank."""
    if "MASTER_ADDR" not in os.environ:
        return None
    return StoreAddress(os.environ["MASTER_ADDR"], env_int("MASTER_PORT", 29500))


class CountedStore:
    """A client connection to the rendezvous store that counts its requests and times them.

    Why: the control plane's cost is requests per second at one host's store, which grows with the
    number of hosts; a run reports what it actually sent (dcgan.distributed.liveness logs the sum at the
    end), and benchmarks/control_plane.py reads the latencies. Only what the heartbeat uses is wrapped.
    """

    def __init__(self, store: dist.TCPStore) -> None:
        self.store = store
        self.requests = 0
        self.latencies_s: list[float] = []
        self.opened = time.monotonic()
        self._lock = threading.Lock()

    def _timed(self, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            with self._lock:
                self.requests += 1
                if len(self.latencies_s) < MAX_LATENCIES:
                    self.latencies_s.append(time.perf_counter() - started)

    def add(self, key: str, amount: int) -> int:
        return self._timed(lambda: self.store.add(key, amount))

    def set(self, key: str, value: str) -> None:
        self._timed(lambda: self.store.set(key, value))

    def get(self, key: str) -> bytes:
        return self._timed(lambda: self.store.get(key))

    def check(self, keys: list[str]) -> bool:
        return self._timed(lambda: self.store.check(keys))

    def append(self, key: str, value: str) -> None:
        self._timed(lambda: self.store.append(key, value))  # type: ignore[attr-defined]  # not in the stubs

    def multi_get(self, keys: list[str]) -> list[bytes]:
        """In requests of at most MULTI_KEYS keys each, so that no request grows with the job."""
        values: list[bytes] = []
        for start in range(0, len(keys), MULTI_KEYS):
            values += self._timed(partial(self.store.multi_get, keys[start : start + MULTI_KEYS]))
        return values

    def multi_set(self, keys: list[str], values: list[str]) -> None:
        send = self.store.multi_set  # type: ignore[attr-defined]  # in torch since 2.2, not in its stubs
        for start in range(0, len(keys), MULTI_KEYS):
            self._timed(partial(send, keys[start : start + MULTI_KEYS], values[start : start + MULTI_KEYS]))

    def rate(self) -> float:
        """Requests per second since the connection opened."""
        return self.requests / max(time.monotonic() - self.opened, 1e-9)


MULTI_KEYS = 1024
"""Keys per multi_get/multi_set request: a verdict over 8,192 hosts reads 8 requests of ~20 KiB, never
one that holds the store's single event loop for long."""
MAX_LATENCIES = 100_000
"""Request times kept per connection (a day of beats): enough for percentiles, bounded in memory."""
