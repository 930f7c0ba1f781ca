"""Process-group setup from the environment, model wrapping for DDP, and replica checks.

Everything is read from the variables torchrun (or submitit's TorchDistributedEnvironment under SLURM)
exports: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. A single process with none of them set
runs the same code path with world size 1 and no process group.

Order of wrapping (see DESIGN.md): SyncBatchNorm (CUDA only) -> device/memory format -> compile the bare
module -> DDP. `torch.compile(DDP(m))` would silently compile nothing useful, and DDP refuses SyncBN
modules on CPU, so CPU/gloo runs keep plain BatchNorm (each rank normalizes with its own batch).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Who this process is, plus two gloo groups for host-side traffic.

    `flag_group` carries the per-step stop-flag agreement from the training thread; `checkpoint_group`
    is used only by checkpoint saves, which may run in a background thread: collectives of two threads
    must never share a group, or their order differs between ranks and they deadlock.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    flag_group: dist.ProcessGroup | None = None
    checkpoint_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def pick_device(preference: str, local_rank: int) -> torch.device:
    """CUDA device for this local rank; cuda:0 when CUDA_VISIBLE_DEVICES already narrows us to one GPU."""
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("train.device=cuda, but no CUDA device is visible to this process")
    count = torch.cuda.device_count()
    index = 0 if count == 1 else local_rank
    if index >= count:
        raise SystemExit(f"local rank {local_rank} has no GPU: only {count} visible (check --nproc_per_node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device_preference: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group described by the environment (NCCL on CUDA, gloo on CPU), if any.

    The timeout bounds how long a collective waits for a dead or stuck rank before raising, so that a
    lost node ends the job with an error instead of a hang.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = pick_device(device_preference, local_rank)
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    flag_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, world_size, local_rank, device, flag_group, checkpoint_group)


def destroy_distributed() -> None:
    """Leave the process group; safe to call on every exit path, initialized or not."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare_module(module: nn.Module, info: DistInfo, *, compile: bool, channels_last: bool) -> tuple[nn.Module, nn.Module]:
    """Return (module to train through, bare module): SyncBN -> device -> compile -> DDP.

    The bare module shares parameters with the wrapper; it is what checkpoints read and what the G step
    calls for D, so that a frozen D never triggers DDP's gradient hooks.
    """
    if info.distributed and info.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    memory_format = torch.channels_last if channels_last and info.device.type == "cuda" else torch.preserve_format
    module = module.to(device=info.device, memory_format=memory_format)
    if compile:
        module.compile()
    if not info.distributed:
        return module, module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids, broadcast_buffers=True), module


def log_batchnorm_mode(info: DistInfo) -> None:
    """Say once which BatchNorm the run uses, since it changes what the statistics mean."""
    if not info.distributed:
        return
    if info.device.type == "cuda":
        log.info("SyncBatchNorm: batch statistics are computed over all %d ranks", info.world_size)
    else:
        log.info(
            "CPU run: plain BatchNorm per rank (torch supports SyncBatchNorm only on CUDA); "
            "running statistics are taken from rank 0"
        )


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank; a CPU collective on the gloo side group."""
    if not info.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.flag_group)
    return bool(value.item())


def sync_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP does this at the start of every forward anyway; doing it before a checkpoint or a sample grid
    makes the saved replicas identical without changing what training computes next.
    """
    if not info.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


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
