"""Hosts made of network namespaces for the multi-host tests and the chaos benchmark: n namespaces, each with a
veth pair to a bridge in a namespace of its own, so only these namespaces talk to each other and a host's link can
be cut (its bridge port set down) and restored. Needs root and iproute2. Names are unique per instance, and
`close` removes every namespace it made, whatever happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIGHTHOUSE_PORT = 29510  # inside the namespaces: nothing else listens there


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """n hosts 10.77.0.1.. on one bridge; host i's interface is eth0, its bridge port p<i>."""

    def __init__(self, n: int):
        self.tag = f"l3{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-h{i}" for i in range(n)]
        self.addrs = [f"10.77.0.{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n  # each host's launcher
        self.started: list[subprocess.Popen] = []  # every process started in a host
        try:
            self.build()
        except BaseException:
            self.close()  # what was made so far
            raise

    def build(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(zip(self.names, self.addrs)):
            ip("netns", "add", name)
            ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            ip("-n", self.switch, "link", "set", f"p{i}", "up")
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")

    def run(self, i: int, python_args: list[str], log: Path) -> subprocess.Popen:
        """`python ARGS` on host i, with its own host name (a UTS namespace) so the event record can tell the
        hosts apart."""
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONPATH=str(ROOT))
        env.pop("GLOO_SOCKET_IFNAME", None)
        cmd = ["ip", "netns", "exec", self.names[i], "unshare", "--uts", "sh", "-c",
               f'hostname host{i} && exec "$@"', "sh", sys.executable, *python_args]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.started.append(p)
        return p

    def start_replica_groups(self, train_args: list[str], log_dir: Path) -> None:
        """One torchft replica group per host, with the commands docs/RELIABILITY.md gives: the lighthouse on host
        0, and on each host `llama3 train` as the launcher (the supervisor that restarts its group) of group i."""
        self.run(0, ["-m", "llama3.train.ft", "lighthouse", f"--bind=[::]:{LIGHTHOUSE_PORT}"],
                 log_dir / "lighthouse.log")
        for i in range(len(self.names)):
            self.procs[i] = self.run(i, [
                "-m", "llama3.train", *train_args, f"ft.replicas={len(self.names)}", f"ft.groups=[{i}]",
                f"ft.lighthouse=http://{self.addrs[0]}:{LIGHTHOUSE_PORT}", f"ft.host={self.addrs[i]}"],
                log_dir / f"host{i}.log")

    def cut(self, i: int) -> None:
        ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def restore(self, i: int) -> None:
        ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def kill(self, i: int) -> None:
        """Host i fails outright: every process in its namespace dies at once (the launcher's workers run in
        sessions of their own, so its process group would not reach them)."""
        pids = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        try:
            for i in range(len(self.names)):
                self.kill(i)
            for p in self.started:
                p.wait(timeout=30)
        finally:
            for name in [*self.names, self.switch]:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
