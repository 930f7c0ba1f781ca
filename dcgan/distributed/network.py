"""Which network interface gloo will use, checked before a multi-host job starts: a host whose name
resolves to loopback would make gloo listen where no other host can reach it. Standard library only
(an ioctl for an interface's address).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from dcgan.distributed.env import spans_hosts
from dcgan.errors import LaunchError


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
