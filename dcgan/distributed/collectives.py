"""The host-side collectives every part of a run shares (a mean over ranks, a gather of objects, an
agreement on a flag, a barrier, a check that replicas agree), and the clock of the time each rank spends
blocked in the step's collectives, which dcgan.distributed.stragglers reads.

The clock lives here, below everything, because the collectives it times (the cross-rank BatchNorm of
dcgan.distributed.batchnorm, the gradient averaging of dcgan.distributed.parallelize) must not import the
straggler analysis above them. No `from __future__ import annotations` here: DDP checks a comm hook's
annotations as objects, and postponed ones are strings.
"""

import time
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dcgan.distributed.env import DistInfo


class CollectiveClock:
    """Host seconds this process spent blocked in the step's collectives, summed since it started.
    One per process (collectives are a per-process resource); read as a difference over a window."""

    def __init__(self) -> None:
        self.seconds = 0.0


COLLECTIVE_CLOCK = CollectiveClock()
"""The clock of this process: the cross-rank BatchNorm exchanges, the explicit gradient all-reduce and
DDP's gradient all-reduce on CPU (`timed_allreduce_hook`) add to it."""


def _blocks_host(tensor: torch.Tensor) -> bool:
    """Whether a collective on `tensor` blocks the host, so that a host clock sees its wait: a CPU
    tensor, outside a compiled graph (where a clock would be traced into a constant)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def all_reduce_timed(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """`dist.all_reduce(tensor)` (a sum), its host wait added to COLLECTIVE_CLOCK where it blocks."""
    if not _blocks_host(tensor):
        dist.all_reduce(tensor, group=group)
        return
    began = time.perf_counter()
    dist.all_reduce(tensor, group=group)
    COLLECTIVE_CLOCK.seconds += time.perf_counter() - began


def timed_allreduce_hook(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's own averaging all-reduce (`default_hooks.allreduce_hook`), waited for here so that the wait
    is timed. For CPU (gloo) models only: it gives up overlapping a bucket's all-reduce with the rest
    of the backward, which a DCGAN's one or two buckets per model hardly use on a CPU."""
    began = time.perf_counter()
    future = default_hooks.allreduce_hook(process_group, bucket)  # type: ignore[arg-type]
    future.wait()
    COLLECTIVE_CLOCK.seconds += time.perf_counter() - began
    return future


def world_group() -> dist.ProcessGroup:
    """The default group, once initialized (torch types it as optional)."""
    world = dist.group.WORLD
    assert world is not None, "the default process group is not initialized"
    return world


T = TypeVar("T")


def broadcast_from_rank0(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite `tensors` with rank 0's values (no-op for one process without a group)."""
    if not info.distributed:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def gather_objects(value: T, group: dist.ProcessGroup | None, world_size: int) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank: one all_gather_object on `group`
    (the host-side gloo group: pickles travel through CPU tensors)."""
    if world_size == 1:
        return [value]
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value, group=group)
    return values


def wait_for_every_rank(info: DistInfo) -> None:
    """Return once every rank has called this (a barrier on the host-side gloo group; no-op for one
    process without a group): the main thread's one way of waiting for the others."""
    if info.distributed:
        dist.barrier(group=info.flag_group)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank; a CPU collective on the gloo side group."""
    if not info.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.flag_group)
    return bool(value.item())


def replicas_agree(module: nn.Module, info: DistInfo) -> list[str]:
    """Names of parameters/buffers that differ from rank 0's on any rank (empty when all agree)."""
    if not info.distributed:
        return []
    differing: list[str] = []
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        mismatch = torch.tensor([0 if torch.equal(reference, tensor.detach()) else 1], device=tensor.device)
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
        if mismatch.item():
            differing.append(name)
    return differing
