"""Host time each rank spends blocked in the step's collectives: the clock dcgan.stragglers reads.

Its own module because the collectives it times live below everything else (the cross-rank BatchNorm
of dcgan.batchnorm, the gradient averaging of dcgan.distributed), which must not import the straggler
analysis above them. No `from __future__ import annotations` here: DDP checks a comm hook's
annotations as objects, and postponed ones are strings.
"""

import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


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
