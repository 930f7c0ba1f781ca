"""Several hosts on this one machine, for tests whose traffic must cross a network: each host is a Linux
network namespace with its own address, hostname and /etc/hosts, joined to the others by a bridge, as
the nodes of a cluster are joined by a switch. The file system stays shared, as a cluster's is.

Why namespaces and not loopback: over loopback a rank's gloo address, a lost host, a partition and a link
rate cannot be told apart from one process among many; here a host's processes can all be killed, its
link taken down while they live on, or its rate limited with `tc tbf` (these kernels have no netem).

Needs root and iproute2/util-linux (`ip`, `unshare`, `tc`); `emulated_hosts` skips with the reason
otherwise. Everything made here is named with this process's id, so two test runs never collide, and
`close` removes it all, killing what still runs inside, also after a failed test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ROOT, TINY, subprocess_env

BRIDGE_HOST = 254
"""Last byte of the bridge's own address: the "head" of the cluster (e.g. a SLURM controller)."""

ON_HOST = Path(__file__).resolve().parents[2] / "slurm" / "local-cluster" / "on-host.sh"
"""Runs a command on a host: its network namespace, hostname and hosts file (the multi-node SLURM
cluster's slurmd runs through it too), from `nodes` and `hosts` in the work directory."""


def missing_requirements() -> str | None:
    """Why hosts cannot be emulated here (None when they can): a skip reason for the tests."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, veth, a bridge)"
    for tool in ("ip", "unshare", "tc", "mount"):
        if shutil.which(tool) is None:
            return f"emulated hosts need `{tool}` (iproute2/util-linux)"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@dataclass
class Host:
    """One emulated host: its name (also its hostname), address, namespace and link."""

    name: str
    address: str
    namespace: str
    veth: str
    """The bridge side of the host's link: where a rate limit goes (the host side is `eth0`)."""


@dataclass
class EmulatedHosts:
    """N hosts named `names`, on subnet 10.<x>.<y>.0/24 chosen from this process's id."""

    names: Sequence[str]
    workdir: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: f"{os.getpid() % 65536:04x}")

    @property
    def subnet(self) -> str:
        number = int(self.tag, 16)
        return f"10.{200 + number % 50}.{number // 50 % 250}"

    @property
    def bridge(self) -> str:
        return f"dgbr{self.tag}"

    @property
    def head_address(self) -> str:
        """The bridge's address, in the root namespace: reachable from every host."""
        return f"{self.subnet}.{BRIDGE_HOST}"

    @property
    def hosts_file(self) -> Path:
        """The cluster's /etc/hosts, as every host sees it."""
        return self.workdir / "hosts"

    def start(self) -> EmulatedHosts:
        """Create the bridge, one namespace and link per host, and the hosts file; check every pair talks."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.head_address}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for index, name in enumerate(self.names, start=1):
            host = Host(name, f"{self.subnet}.{index}", f"dg{self.tag}-{name}", f"dgv{self.tag}{index}")
            _sh("ip", "netns", "add", host.namespace)
            self.hosts[name] = host
            _sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            _sh("ip", "link", "set", host.veth, "master", self.bridge)
            _sh("ip", "link", "set", host.veth, "up")
            _sh("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _sh("ip", "-n", host.namespace, "link", "set", "lo", "up")
            _sh("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        lines = ["127.0.0.1 localhost", f"{self.head_address} head"]
        lines += [f"{host.address} {host.name}" for host in self.hosts.values()]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        (self.workdir / "nodes").write_text(
            "".join(f"{h.name} {h.address} {h.namespace}\n" for h in self.hosts.values())
        )
        for host in self.hosts.values():
            for peer in [*self.hosts.values()]:
                self.wait_reachable(host.name, peer.address)
        return self

    def wait_reachable(self, name: str, address: str, timeout: float = 10.0) -> None:
        """Wait until `name` reaches `address` (a fresh veth takes a moment to forward). A TCP connection to
        a closed port is refused by a reachable host and times out otherwise: no ping needed."""
        probe = f"exec 3<>/dev/tcp/{address}/9"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = _sh(
                "ip", "netns", "exec", self.hosts[name].namespace, "timeout", "1", "bash", "-c", probe, check=False
            )
            if "refused" in result.stderr:
                return
            time.sleep(0.1)
        raise RuntimeError(f"emulated host {name} cannot reach {address}")

    def command(self, name: str, argv: Sequence[str], *, loopback_name: bool = False) -> list[str]:
        """`argv` as run on host `name`: its network, its hostname, the cluster's hosts file. With
        `loopback_name`, the host's own name resolves to 127.0.1.1 there (Debian's default line)."""
        hosts = self.hosts_file
        if loopback_name:
            hosts = self.workdir / f"hosts.{name}"
            others = [line for line in self.hosts_file.read_text().splitlines() if not line.endswith(f" {name}")]
            hosts.write_text("\n".join([f"127.0.1.1 {name}", *others]) + "\n")
        return ["env", f"ON_HOST_HOSTS={hosts}", "bash", str(ON_HOST), str(self.workdir), name, *argv]

    def popen(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        loopback_name: bool = False,
    ) -> subprocess.Popen:
        """Start `argv` on host `name` in a session of its own, stdout and stderr into `log`."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.command(name, argv, loopback_name=loopback_name),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def run(self, name: str, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, timeout=timeout)

    def pids(self, name: str) -> list[int]:
        """Every process living in host `name`'s network namespace."""
        result = _sh("ip", "netns", "pids", self.hosts[name].namespace, check=False)
        return [int(pid) for pid in result.stdout.split()]

    def kill_all(self, name: str) -> list[int]:
        """SIGKILL every process of host `name`: the host is lost (power, kernel panic, OOM of the node)."""
        killed = self.pids(name)
        for pid in killed:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return killed

    def set_link(self, name: str, up: bool) -> None:
        """Take host `name`'s link down (a partition: its processes live on, cut off) or up again."""
        _sh("ip", "-n", self.hosts[name].namespace, "link", "set", "eth0", "up" if up else "down")

    def limit_rate(self, name: str, mbit: int) -> None:
        """Host `name`'s link at `mbit` Mbit/s each way (tbf on both ends of its veth pair)."""
        host = self.hosts[name]
        tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "50ms"]
        _sh("tc", "qdisc", "replace", "dev", host.veth, *tbf)
        _sh("ip", "netns", "exec", host.namespace, "tc", "qdisc", "replace", "dev", "eth0", *tbf)

    def close(self) -> None:
        """Kill what still runs on the hosts, then remove the namespaces, links and bridge."""
        for name in list(self.hosts):
            self.kill_all(name)
        deadline = time.monotonic() + 10
        while any(self.pids(name) for name in self.hosts) and time.monotonic() < deadline:
            time.sleep(0.1)
        for host in self.hosts.values():
            _sh("ip", "netns", "del", host.namespace, check=False)
            _sh("ip", "link", "del", host.veth, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        self.hosts.clear()


@contextmanager
def emulated_hosts(names: Sequence[str], workdir: Path) -> Iterator[EmulatedHosts]:
    """Hosts `names` for the block's duration, removed afterwards whatever happened."""
    hosts = EmulatedHosts(names, workdir)
    try:
        yield hosts.start()
    finally:
        hosts.close()


@dataclass
class Launch:
    """One torchrun per host, started together, as a cluster's launcher does."""

    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen]
    started: float

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def wait(self, timeout: float) -> dict[str, tuple[int, float]]:
        """Each host's (exit status, seconds since start); a process still running at `timeout` fails."""
        ended: dict[str, tuple[int, float]] = {}
        deadline = time.monotonic() + timeout
        while len(ended) < len(self.procs) and time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = (proc.returncode, time.monotonic() - self.started)
            time.sleep(0.1)
        running = [name for name in self.procs if name not in ended]
        assert not running, f"still running after {timeout} s on {running}:\n" + "\n".join(
            self.log(n)[-3000:] for n in running
        )
        return ended


def torchrun_on(
    hosts: EmulatedHosts,
    names: Sequence[str],
    nproc: int,
    run_dir: Path,
    *overrides: str,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
    loopback_name: bool = False,
    tag: str = "run",
    nnodes: str = "",
    command: str = "train",
) -> Launch:
    """`torchrun --nnodes=len(names) --nproc_per_node=nproc -m dcgan train tiny.yaml` on each host, with the
    c10d rendezvous on the first host's name (as slurm/train.sbatch does); `command` runs another dcgan
    command that takes a config and overrides (e.g. doctor) instead of train."""
    head = names[0]
    full_env = subprocess_env(PYTHONUNBUFFERED="1", **(env or {}))
    logs, procs = {}, {}
    started = time.monotonic()
    for name in names:
        logs[name] = hosts.workdir / f"{tag}.{name}.log"
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes or len(names)}",
            f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:29400",
            f"--rdzv-id={tag}",
            *flags,
            "-m",
            "dcgan",
            command,
            str(TINY),
            f"run.dir={run_dir}",
            "log.wandb=disabled",
            *overrides,
        ]
        procs[name] = hosts.popen(name, argv, log=logs[name], env=full_env, cwd=ROOT, loopback_name=loopback_name)
    return Launch(logs, procs, started)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("dcgan: error: ")]


def worker_traceback(text: str) -> bool:
    """Whether a training process printed a traceback (torchrun's own failure summary does not count)."""
    return f'File "{ROOT / "dcgan"}' in text


def worker_pids(hosts: EmulatedHosts, name: str) -> list[int]:
    """The training processes (not torchrun's agent) on host `name`."""
    pids = []
    for pid in hosts.pids(name):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dcgan" in command and b"torch.distributed.run" not in command:
            pids.append(pid)
    return pids
