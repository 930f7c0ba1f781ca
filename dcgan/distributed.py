"""Process-group setup from the environment, model wrapping for DDP, and replica checks.

Everything is read from the variables torchrun (or submitit's TorchDistributedEnvironment under SLURM)
exports: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. A single process with none of them set
runs without a process group, unless `dist.force` asks for the multi-rank code path anyway (so that one
GPU exercises NCCL, cross-rank BatchNorm and the capture of the multi-rank step).

Order of wrapping: cross-rank BatchNorm (dcgan.batchnorm, CPU and CUDA alike) -> device/memory format ->
compile the bare module -> DDP. Compiling the bare module first keeps one graph per model: compiled
inside DDP, dynamo's DDP optimizer would split the graph at every gradient bucket boundary.
"""

from __future__ import annotations

import datetime
import fcntl
import inspect
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan.batchnorm import convert_to_cross_rank
from dcgan.collective_clock import all_reduce_timed, timed_allreduce_hook
from dcgan.config import Config
from dcgan.errors import DcganError, LaunchError
from dcgan.liveness import Liveness, StoreAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Who this process is, plus two gloo groups for host-side traffic.

    `flag_group` carries the main thread's host-side collectives: the `any_rank` agreements (stop flag,
    non-finite loss, ...) and evaluation's gathers of features (`dcgan.evaluate`); on gloo it is the
    default group itself. `checkpoint_group` is used only by checkpoint saves, which may run in a
    background thread: collectives of two threads must never share a group, or their order differs
    between ranks and they deadlock.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    flag_group: dist.ProcessGroup | None = None
    checkpoint_group: dist.ProcessGroup | None = None
    forced: bool = False
    """A process group of one (dist.force): the multi-rank code path, run by a single process."""

    @staticmethod
    def single(device: torch.device | str = "cpu") -> DistInfo:
        """One process and no process group: benchmarks, planning, tools that read a checkpoint."""
        return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group exists and collectives run: several ranks, or one forced."""
        return self.world_size > 1 or self.forced


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def launched_world_size() -> int:
    """The number of ranks the launcher started (torchrun, srun via submitit), known before any rendezvous:
    what a config is checked against before the process group exists."""
    return _env_int("WORLD_SIZE", 1)


def pick_device(preference: str, local_rank: int) -> torch.device:
    """CUDA device for this local rank; cuda:0 when CUDA_VISIBLE_DEVICES already narrows us to one GPU."""
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("train.device=cuda, but no CUDA device is visible to this process")
    count = torch.cuda.device_count()
    index = 0 if count == 1 else local_rank
    if index >= count:
        raise LaunchError(f"local rank {local_rank} has no GPU: only {count} visible (check --nproc_per_node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
"""What torchrun needs in its own environment for `--max-restarts` to work: by default (torch >= 2.5)
the agent keeps one store across restarts, and a restarted rank can read the previous round's
addresses and fail to connect ("connectFullMesh ... Connection refused"; pytorch/pytorch#135712).
Measured here: 2 of 2 restarts failed without it, 4 of 4 resumed with it."""


def check_elastic_restarts() -> None:
    """Refuse, before any work, restarts that torchrun would start but not reconnect: one line naming
    the fix beats a first restart that fails after hours of training."""
    restarts = _env_int("TORCHELASTIC_MAX_RESTARTS", 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise LaunchError(
            f"torchrun --max-restarts={restarts} needs {SHARED_STORE_FIX} in torchrun's environment "
            f"(restarted ranks otherwise read stale addresses from torch's shared store): {SHARED_STORE_FIX} torchrun ..."
        )


def check_srun_tasks() -> None:
    """Refuse tasks that srun started without telling them their rank: each would run alone (N separate
    runs racing for run.dir, or N one-rank doctors each saying "ok")."""
    tasks = _env_int("SLURM_STEP_NUM_TASKS", 1)
    if tasks > 1 and not os.environ.get("WORLD_SIZE"):
        raise LaunchError(
            f"srun started {tasks} tasks, but none knows its rank (WORLD_SIZE is not set), so each would run "
            "alone: start one torchrun per node (srun --ntasks-per-node=1 torchrun --nnodes=... -m dcgan ...), "
            "as slurm/train.sbatch does, or submit training with python -m launch.slurm"
        )


def init_distributed(
    device_preference: str = "auto",
    timeout_s: int = 600,
    force: bool = False,
    liveness_s: float = 15.0,
) -> DistInfo:
    """Join the process group described by the environment (NCCL on CUDA, gloo on CPU), if any.

    Two bounds on waiting for other ranks: `timeout_s` for a collective whose peers are alive but slow
    (a long save), and `liveness_s` for a peer that is gone (see dcgan.liveness; 0 turns it off). The
    heartbeat starts before the process group, so a peer lost during start-up is caught too. With
    `force` and no launcher, a single process forms a group of one through an in-memory store (no port,
    no MASTER_ADDR needed).
    """
    global _LIVENESS
    if os.environ.get("RANK") and not os.environ.get("WORLD_SIZE"):
        raise LaunchError(
            f"RANK={os.environ['RANK']} is set but WORLD_SIZE is not: start the ranks with torchrun or srun"
        )
    check_elastic_restarts()
    check_srun_tasks()
    world_size = launched_world_size()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
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
            _LIVENESS = Liveness(address, rank, world_size, liveness_s).start()
    try:
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        flag_group = _gloo_group(timeout) if backend != "gloo" else _world()
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


def rendezvous_store() -> StoreAddress | None:
    """The rendezvous store of a launched job (MASTER_ADDR, MASTER_PORT), where the heartbeat and the
    hang report talk; None for a process that was not launched as a rank."""
    if "MASTER_ADDR" not in os.environ:
        return None
    return StoreAddress(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 29500))


def spans_hosts() -> bool:
    """Whether the job's ranks live on more than one host, from what the launchers export: torchrun's
    LOCAL_WORLD_SIZE (ranks on this host) where set, else the nodes of this SLURM job step."""
    local = _env_int("LOCAL_WORLD_SIZE", 0)
    if local:
        return local < _env_int("WORLD_SIZE", 1)
    return _env_int("SLURM_STEP_NUM_NODES", _env_int("SLURM_JOB_NUM_NODES", 1)) > 1


def check_gloo_address(master_addr: str) -> None:
    """Refuse, before any work, a multi-host job in which gloo would listen on loopback.

    Without GLOO_SOCKET_IFNAME, gloo binds the address this host's name resolves to; where that is a
    loopback address (Debian's `127.0.1.1 <host>` line, a container's `127.0.0.1 <host>`), the rendezvous
    still succeeds, and the first collective then fails or hangs because no other host can reach it.
    GPU jobs are concerned too: their host-side groups (stop flags, checkpoints) are gloo.
    """
    if os.environ.get("GLOO_SOCKET_IFNAME") or not spans_hosts():
        return
    name = socket.gethostname()
    try:
        resolved = socket.gethostbyname(name)
    except OSError:
        return  # gloo reports an unresolvable name itself, naming it
    if not ipaddress.ip_address(resolved).is_loopback:
        return
    interface = interface_towards(master_addr) or first_network_interface()
    fix = f"GLOO_SOCKET_IFNAME={interface}" if interface else "GLOO_SOCKET_IFNAME=<this host's network interface>"
    raise LaunchError(
        f"this host's name {name} resolves to {resolved} (loopback), so gloo would listen where the other hosts of "
        f"this multi-host job cannot reach it: set {fix} for the job (and NCCL_SOCKET_IFNAME on GPUs), or make "
        f"{name} resolve to this host's network address in /etc/hosts or DNS"
    )


def interface_towards(address: str) -> str | None:
    """The name of this host's network interface on the route to `address` (None when that is loopback
    or unknown): the route's source address, matched against each interface's address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(address), 9))  # UDP: picks the route, sends nothing
            source = probe.getsockname()[0]
    except OSError:
        return None
    if ipaddress.ip_address(source).is_loopback:
        return None
    for _, interface in socket.if_nameindex():
        if _ipv4_of(interface) == source:
            return interface
    return None


def first_network_interface() -> str | None:
    """The first interface with a non-loopback IPv4 address: the suggestion where the route to the
    rendezvous is itself loopback (this host is the rendezvous host, and its name resolves to loopback)."""
    for _, interface in socket.if_nameindex():
        address = _ipv4_of(interface)
        if address is not None and not ipaddress.ip_address(address).is_loopback:
            return interface
    return None


def _ipv4_of(interface: str) -> str | None:
    """An interface's IPv4 address (SIOCGIFADDR), or None if it has none."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", interface[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


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
    Any other error is this rank's own (every rank may be raising it): peers that end now are no news."""
    if _LIVENESS is None:
        return
    if isinstance(error, RuntimeError) and not isinstance(error, DcganError):
        _LIVENESS.explain(error)
    _LIVENESS.ending()


def _world() -> dist.ProcessGroup:
    """The default group, once initialized (torch types it as optional)."""
    world = dist.group.WORLD
    assert world is not None, "the default process group is not initialized"
    return world


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


GradientSync = Literal["ddp", "explicit"]
"""How replicas average gradients: DDP's bucketed all-reduce, overlapped with the backward pass; or one
flat all-reduce per model called by the step itself (`average_gradients`), which a CUDA graph can
capture whole."""


def gradient_sync(config: Config, info: DistInfo) -> GradientSync:
    """DDP for eager and compiled steps; the step's own flat all-reduce where a graph captures it."""
    return "explicit" if config.train.cuda_graph and info.distributed else "ddp"


Bare = TypeVar("Bare", bound=nn.Module)
T = TypeVar("T")


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
        module = convert_to_cross_rank(module, _world())
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
        wrapped.register_comm_hook(None, timed_allreduce_hook)  # its wait, timed (dcgan.stragglers)
    return wrapped, module


_DDP_BUFFER_SYNC_ARG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else "broadcast_buffers"
)
"""DDP's switch for broadcasting rank 0's buffers before each forward: renamed in newer torch (where the
old name warns that it is deprecated); both still sync buffers once, when DDP is built."""


def broadcast_state(module: nn.Module, info: DistInfo) -> None:
    """Start every replica from rank 0's parameters and buffers, as DDP's constructor does."""
    _broadcast_from_rank0([*module.parameters(), *module.buffers()], info)


def _broadcast_from_rank0(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite `tensors` with rank 0's values (no-op for one process without a group)."""
    if not info.distributed:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


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


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank; a CPU collective on the gloo side group."""
    if not info.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.flag_group)
    return bool(value.item())


def sync_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP does this before every forward only with per-rank BatchNorm (model.sync_bn=false), and not at
    all in CUDA-graph mode (no DDP); doing it before a checkpoint or a sample grid makes the saved
    replicas identical without changing what training computes next.
    """
    _broadcast_from_rank0(list(module.buffers()), info)


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
