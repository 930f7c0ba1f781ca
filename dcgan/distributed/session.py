"""A command's time in the process group: joining it from the environment, explaining a failure before
any cleanup can hang on a lost peer, and leaving it on every exit path.

Everything is read from the variables torchrun (or submitit's TorchDistributedEnvironment under SLURM)
exports (dcgan.distributed.env): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. A single process
with none of them set runs without a process group, unless `dist.force` asks for the multi-rank code path
anyway (so that one GPU exercises NCCL, cross-rank BatchNorm and the capture of the multi-rank step). The
heartbeat (dcgan.distributed.liveness) starts before the group, so a peer lost at start-up is caught too.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from dcgan.distributed.collectives import world_group
from dcgan.distributed.env import (
    DistInfo,
    check_elastic_restarts,
    check_rank_has_world,
    check_srun_tasks,
    launched_local_rank,
    launched_local_world_size,
    launched_rank,
    launched_world_size,
    pick_device,
)
from dcgan.distributed.liveness import Liveness
from dcgan.distributed.network import check_gloo_address
from dcgan.distributed.store import rendezvous_store
from dcgan.errors import CheckpointWriteError, DcganError, LaunchError


def init_distributed(
    device_preference: str = "auto",
    timeout_s: int = 600,
    force: bool = False,
    liveness_s: float = 15.0,
) -> DistInfo:
    """Join the process group described by the environment (NCCL on CUDA, gloo on CPU), if any.

    Two bounds on waiting for other ranks: `timeout_s` for a collective whose peers are alive but slow
    (a long save), and `liveness_s` for a peer that is gone (see dcgan.distributed.liveness; 0 turns it off). The
    heartbeat starts before the process group, so a peer lost during start-up is caught too. With
    `force` and no launcher, a single process forms a group of one through an in-memory store (no port,
    no MASTER_ADDR needed).
    """
    global _LIVENESS
    check_rank_has_world()
    check_elastic_restarts()
    check_srun_tasks()
    world_size = launched_world_size()
    rank = launched_rank()
    local_rank = launched_local_rank()
    device = pick_device(device_preference, local_rank)
    if world_size == 1 and not force:
        return DistInfo.single(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    elif "MASTER_ADDR" not in os.environ:
        raise LaunchError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: start the ranks with torchrun or srun")
    if world_size > 1:
        check_gloo_address(os.environ["MASTER_ADDR"])
        address = rendezvous_store()
        if liveness_s > 0 and address is not None:
            _LIVENESS = Liveness(address, rank, world_size, liveness_s, per_host=launched_local_world_size()).start()
    try:
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        flag_group = _gloo_group(timeout) if backend != "gloo" else world_group()
        checkpoint_group = _gloo_group(timeout)
    except BaseException as exc:
        destroy_distributed(exc)  # the peers learn this rank's error at once, not by its silence
        raise
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        flag_group=flag_group,
        checkpoint_group=checkpoint_group,
        forced=world_size == 1,
    )


_LIVENESS: Liveness | None = None
"""This process's heartbeat, like the process group a piece of global state: `destroy_distributed` ends it."""


@contextmanager
def distributed_session(
    device_preference: str = "auto",
    timeout_s: int = 600,
    force: bool = False,
    liveness_s: float = 15.0,
    *,
    release: Callable[[], None] | None = None,
) -> Iterator[DistInfo]:
    """A command's time in the process group (`init_distributed`'s arguments), yielding this rank's
    DistInfo. An exception that ends the block, KeyboardInterrupt and SystemExit included, is explained
    first (`explain_failure`: a lost peer is named in one line before a cleanup can hang on it) and passed
    on. On every exit `release` then frees what the command holds (before the group goes: a checkpoint
    still being saved needs it), and the group is left, with the failure's line (`destroy_distributed`)."""
    info = init_distributed(device_preference, timeout_s, force=force, liveness_s=liveness_s)
    failure: BaseException | None = None
    try:
        yield info
    except BaseException as exc:
        failure = exc
        explain_failure(exc)
        raise
    finally:
        if release is not None:
            release()
        destroy_distributed(failure)


def explain_failure(error: BaseException) -> None:
    """This rank is failing. A collective's error (RuntimeError, of which torch's DistError is one) may
    be a lost peer: wait for the heartbeat's verdict, which ends the process with one line naming it.
    Any other error is this rank's own (every rank may be raising it): peers that end now are no news,
    except a checkpoint that failed in an exchange between ranks (a lost peer fails it too)."""
    if _LIVENESS is None:
        return
    in_collective = isinstance(error, CheckpointWriteError) and error.in_collective
    if isinstance(error, RuntimeError) and (in_collective or not isinstance(error, DcganError)):
        _LIVENESS.explain(error)
    _LIVENESS.ending()


def _gloo_group(timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A new gloo group of every rank (torch types the result as possibly a non-member marker)."""
    group = dist.new_group(backend="gloo", timeout=timeout)
    assert isinstance(group, dist.ProcessGroup), "every rank is a member of a group of all ranks"
    return group


def destroy_distributed(error: BaseException | None = None) -> None:
    """Leave the process group, then stop the heartbeat saying whether this rank finished or failed
    (with `error`'s line, which rank 0 then reports at once); safe on every exit path."""
    global _LIVENESS
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _LIVENESS is not None:
        _LIVENESS.stop(error)
        _LIVENESS = None
