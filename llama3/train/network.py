"""Multi-host settings the trainer checks or sets itself before it joins the process group (docs/RELIABILITY.md,
"Multi-host"). Without them a job across hosts times out in the rendezvous or hangs silently in its first
collective; with a wrong one it should fail at once, naming the setting."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import sys

from .config import ConfigError

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def spans_hosts() -> bool:
    """Whether this torchrun job has workers on more than one host (agent)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", world))


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds this IPv4 address on this host, or None."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None


def route_source(address: str) -> str:
    """This host's address on the route to `address` (no packet is sent: a UDP connect only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return s.getsockname()[0]


def check_multihost_settings(gloo: bool) -> None:
    """For a job across hosts: check that the rendezvous address is reachable from other hosts and that every
    attempt gets a fresh store, and for gloo pick its interface (GLOO_SOCKET_IFNAME) when it is not set: the one
    this host reaches the rendezvous host by. Left to itself gloo binds the address this host's name resolves
    to, which may be a loopback address or another host's."""
    if not spans_hosts():
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # the agents' shared store keeps the keys of earlier attempts, and the hosts' restart counts (which would
        # scope them) differ once a host has left and come back: the ranks would wait on each other's keys forever
        raise ConfigError("a job across hosts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment "
                          "on every host, so that each attempt's process group gets a fresh store")
    master = os.environ["MASTER_ADDR"]
    try:
        master_ip = socket.gethostbyname(master)
    except OSError as e:
        raise ConfigError(f"MASTER_ADDR {master!r} (advertised by torchrun's agent on the first host) does not "
                          f"resolve here ({e}): start torchrun with --local-addr <that host's address> on every "
                          "host") from None
    if ipaddress.ip_address(master_ip).is_loopback:
        raise ConfigError(f"MASTER_ADDR {master!r} resolves to the loopback address {master_ip}, which the other "
                          "hosts cannot reach: start torchrun with --local-addr <this host's address> on every host "
                          "(and --rdzv-conf is_host=true on the host that serves the rendezvous)")
    if not gloo or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    source = route_source(master_ip)
    name = interface_of(source)
    if name is None or name == "lo":
        raise ConfigError(f"cannot tell which network interface carries {source} to {master_ip}: set "
                          "GLOO_SOCKET_IFNAME to the interface the hosts reach each other by")
    os.environ["GLOO_SOCKET_IFNAME"] = name
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"GLOO_SOCKET_IFNAME was not set: using {name} ({source}), the route to {master_ip}", file=sys.stderr,
              flush=True)
