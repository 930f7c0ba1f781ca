"""Wrapping models for training on several ranks: cross-rank BatchNorm -> device/memory format ->
compile the bare module -> DDP (compiling first keeps one graph per model: compiled inside DDP, dynamo's
DDP optimizer splits the graph at every gradient bucket), or the step's own flat gradient all-reduce
where a CUDA graph captures the whole step; and the buffer syncs that keep replicas identical.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Literal, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan.config import Config
from dcgan.distributed.batchnorm import convert_to_cross_rank
from dcgan.distributed.collectives import all_reduce_timed, broadcast_from_rank0, timed_allreduce_hook, world_group
from dcgan.distributed.env import DistInfo

log = logging.getLogger(__name__)


GradientSync = Literal["ddp", "explicit"]
"""How replicas average gradients: DDP's bucketed all-reduce, overlapped with the backward pass; or one
flat all-reduce per model called by the step itself (`average_gradients`), which a CUDA graph can
capture whole."""


def gradient_sync(config: Config, info: DistInfo) -> GradientSync:
    """DDP for eager and compiled steps; the step's own flat all-reduce where a graph captures it."""
    return "explicit" if config.train.cuda_graph and info.distributed else "ddp"


Bare = TypeVar("Bare", bound=nn.Module)


def prepare_module(
    module: Bare,
    info: DistInfo,
    *,
    compile: bool,
    channels_last: bool,
    sync_bn: bool = True,
    gradient_sync: GradientSync = "ddp",
) -> tuple[nn.Module, Bare]:
    """Return (module to train through, bare module): cross-rank BN -> device -> compile -> DDP.

    The bare module shares parameters with the wrapper; it is what checkpoints read and what the G step
    calls for D, so that a frozen D never triggers DDP's gradient hooks. With synchronized BatchNorm every
    rank computes the same running statistics, so DDP need not broadcast buffers before each forward.
    """
    if info.distributed and sync_bn:
        module = convert_to_cross_rank(module, world_group())
    module = module.to(device=info.device)
    if channels_last and info.device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    if compile:
        if not torch.cuda.is_available():
            # inductor's C++ backend probes for CUDA and warns "No CUDA runtime is found" at every compile
            # on a machine that has none: noise where no CUDA was asked for
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        module.compile()
    if not info.distributed:
        return module, module
    if gradient_sync == "explicit":
        broadcast_state(module, info)
        return module, module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    buffer_sync: dict[str, Any] = {_DDP_BUFFER_SYNC_ARG: not sync_bn}
    wrapped = DDP(module, device_ids=device_ids, **buffer_sync)
    if info.device.type == "cpu":
        wrapped.register_comm_hook(None, timed_allreduce_hook)  # its wait, timed (dcgan.distributed.stragglers)
    return wrapped, module


_DDP_BUFFER_SYNC_ARG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else "broadcast_buffers"
)
"""DDP's switch for broadcasting rank 0's buffers before each forward: renamed in newer torch (where the
old name warns that it is deprecated); both still sync buffers once, when DDP is built."""


def eager_forward(module: nn.Module, *args: Any) -> Any:
    """`module(*args)` without torch.compile, where `module.compile()` compiled its calls: what a
    gradient of a gradient needs (AOTAutograd has no double backward). Hooks and parametrizations still
    run: `_call_impl` is the eager call that the compiled one wraps."""
    return module._call_impl(*args)


def broadcast_state(module: nn.Module, info: DistInfo) -> None:
    """Start every replica from rank 0's parameters and buffers, as DDP's constructor does."""
    broadcast_from_rank0([*module.parameters(), *module.buffers()], info)


def average_gradients(module: nn.Module, info: DistInfo) -> None:
    """Replace each gradient of `module` by its mean over ranks: ONE all-reduce of all of them, flat.

    Static shapes and no host read, so a CUDA graph captures it with the rest of the step (NCCL >= 2.9.6
    allows collectives inside a capture). No-op for one process without a group.
    """
    if not info.distributed:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_timed(flat)
    flat /= info.world_size
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(mean.view(grad.shape))


def log_batchnorm_mode(info: DistInfo, sync_bn: bool, global_batch: int) -> None:
    """Say once which BatchNorm statistics the run uses, since it changes what they mean (and, per rank,
    whether the run's trajectory depends on its number of ranks)."""
    if not info.distributed:
        return
    if sync_bn:
        log.info(
            "cross-rank BatchNorm: batch statistics over all %d rank(s), %d images (one all-reduce per layer)",
            info.world_size,
            global_batch,
        )
    else:
        log.info(
            "per-rank BatchNorm (model.sync_bn=false): each rank normalizes its own %d images; "
            "running statistics are taken from rank 0; the run's trajectory depends on its number of ranks",
            global_batch // info.world_size,
        )


def sync_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP does this before every forward only with per-rank BatchNorm (model.sync_bn=false), and not at
    all in CUDA-graph mode (no DDP); doing it before a checkpoint or a sample grid makes the saved
    replicas identical without changing what training computes next.
    """
    broadcast_from_rank0(list(module.buffers()), info)
