"""The rendezvous store a launched job shares (MASTER_ADDR:MASTER_PORT): where the heartbeat and the
hang report talk, with keys prefixed per torchrun round so that a restarted round never reads the
previous round's beats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dcgan.distributed.env import env_int, torchrun_round


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
