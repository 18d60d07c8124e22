"""Recovery without a cold start: data-parallel replica groups kept in step by torchft.

torchrun's answer to a dead rank is to stop every process and start the job again (a cold start: imports,
rendezvous, model build, checkpoint load). With `ft.replicas=N`, `llama3 train` instead runs N replica groups,
each its own process, and serves a torchft lighthouse that forms a quorum of the live groups at every step; the
gradients are averaged over that quorum only. When a group dies, the others notice in the step's all-reduce
(`ft.timeout_s`) or by its missing heartbeat at the lighthouse, drop that step's update (it would not have been
averaged over the same groups everywhere) and go on with the next quorum without restarting. The launcher starts
the dead group again; it joins the next quorum and heals: it copies model, optimizer, schedule and data position
from a live peer's memory instead of reading a checkpoint from disk.

    llama3 train ft.replicas=3 ...                       # launcher + lighthouse here, 3 groups
    python -m llama3.train.ft lighthouse --bind [::]:29510   # or a lighthouse of its own, for groups on many hosts
    llama3 train ft.replicas=2 ft.groups=[1] ft.lighthouse=http://HOST0:29510 ft.host=ADDR ...   # this host's groups

One process per replica group here (FT-DDP). Group r takes block r of each global batch, so while a group is away
its block of each step is not trained on (those steps average over fewer rows): the difference from a fault-free
run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path


def lighthouse(bind: str, min_replicas: int = 1, join_timeout_ms: int = 100, heartbeat_timeout_ms: int = 1000):
    """A torchft lighthouse (it runs in this process's threads; keep the returned object alive)."""
    from torchft._torchft import LighthouseServer
    return LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                            quorum_tick_ms=10, heartbeat_timeout_ms=heartbeat_timeout_ms)


def use_interface_of(host: str) -> None:
    """Gloo binds the address this host's name resolves to (often none, or a loopback one: the peers' first
    collective then hangs); a group reached at `host` must talk from the interface that holds it."""
    from .config import ConfigError
    from .network import interface_of
    address = socket.gethostbyname(host)
    if os.environ.get("GLOO_SOCKET_IFNAME") or ipaddress.ip_address(address).is_loopback:
        return
    name = interface_of(address)
    if name is None:
        raise ConfigError(f"ft.host {host} is not an address of this host: give the address the other replica "
                          "groups reach this one at (or set GLOO_SOCKET_IFNAME)")
    os.environ["GLOO_SOCKET_IFNAME"] = name


def transport_at(host: str, timeout: timedelta):
    """torchft's HTTP transport, which a healing group copies a live peer's state through, advertised at `host`:
    torchft's own advertises this host's name, which the other hosts may not resolve (the heal then fails)."""
    from torchft.checkpointing.http_transport import HTTPTransport

    class Transport(HTTPTransport):
        def address(self) -> str:
            netloc = f"[{host}]" if ":" in host else host
            return f"http://{netloc}:{self._server.socket.getsockname()[1]}/checkpoint/"

    return Transport(timeout=timeout, num_chunks=0)


class ReplicaGroup:
    """This process as one torchft replica group: the per-step quorum, the fault-tolerant all-reduce, the commit
    and the heal from a live peer (`state_dict`/`load_state_dict`: what a healing group copies)."""

    def __init__(self, ft, state_dict, load_state_dict):
        try:
            from torchft import Manager, ProcessGroupGloo
        except ImportError:
            raise SystemExit("ft.replicas needs torchft: pip install 'llama3[ft]'") from None
        from torch.distributed import TCPStore
        self.id, self.size = ft.replica_id, ft.replicas
        self.healed_at: float | None = None  # set when a peer's state was loaded, for the heal's record
        self._load = load_state_dict

        def load(state):
            self._load(state)
            self.healed_at = time.time()

        use_interface_of(ft.host)
        # the quorum's gloo group rendezvouses in one member's store, so the others must reach it at ft.host
        self.store = TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False)
        timeout = timedelta(seconds=ft.timeout_s)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout), min_replica_size=1, load_state_dict=load, state_dict=state_dict,
            checkpoint_transport=transport_at(ft.host, timeout),
            use_async_quorum=False,  # a healing group loads its peer's state before the step, not during it
            replica_id=f"replica{self.id}", lighthouse_addr=ft.lighthouse, store_addr=ft.host,
            store_port=self.store.port, rank=0, world_size=1, timeout=timeout,
            quorum_timeout=timedelta(seconds=max(60.0, ft.join_timeout_s)), connect_timeout=timedelta(seconds=10),
            heartbeat_interval=timedelta(milliseconds=100), hostname=ft.host)

    def start_step(self) -> None:
        """Join this step's quorum; a group behind its peers (a fresh replacement) heals here."""
        self.manager.start_quorum()

    def wait_for_everyone(self, timeout_s: float) -> int:
        """At a fresh start, quorum until every group has joined (or the time is up), so that the run starts
        with all of them; the number that joined."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.manager.start_quorum()
            if self.participants() >= self.size or time.monotonic() > deadline:
                return self.participants()
            time.sleep(0.05)

    def participants(self) -> int:
        return self.manager.num_participants()

    @property
    def leads(self) -> bool:
        """The quorum's first member writes the run's shared files (events, metrics, disk checkpoints)."""
        return self.manager.participating_rank() == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the quorum (garbage if a member died mid-way; the step then does not commit)."""
        import torch
        self.manager.allreduce(t, reduce_op=torch.distributed.ReduceOp.SUM).wait()
        return t

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """The quorum's mean gradient in one flat all-reduce."""
        import torch
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        self.manager.allreduce(flat).wait()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def errored(self) -> bool:
        return self.manager.errored() is not None

    def commit(self) -> bool:
        """Whether every member finished this step (then the optimizer may apply it): torchft's vote."""
        return self.manager.should_commit()

    def set_step(self, step: int) -> None:
        """After loading a checkpoint or rolling back: the step this group reports to the quorum."""
        self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


# ---- the launcher: `llama3 train ft.replicas=N` ------------------------------------------------------------------

def replica_env() -> dict:
    """A group is not a torchrun worker, even when the launcher runs under torchrun (as its whole-job fallback)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")}
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: the groups share the cores
    return env


def launch(cfg, config: str | None, overrides: list[str], run_dir: str) -> None:
    """Serve the lighthouse (unless ft.lighthouse names one), start the ft.replicas groups as processes and start
    again any that dies: while others live it heals from them (checkpoint.resume=false: nothing read from disk);
    when none is left, all start again from the newest disk checkpoint. A spare process, already past its
    imports, takes a dead group's place (`ft.spares`), so the replacement skips the cold start. Returns when every
    group has finished."""
    from .events import EventLog
    ft = cfg.ft
    os.environ.setdefault("RUST_LOG", "error")  # torchft's lighthouse and managers log every quorum otherwise
    server = None
    address = ft.lighthouse
    if address is None:
        server = lighthouse("[::]:0", heartbeat_timeout_ms=int(ft.heartbeat_timeout_s * 1000))
        address = server.address()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    events = EventLog(Path(run_dir), rank=0)
    base = [*(["--config", config] if config else []), *overrides, f"run.dir={run_dir}", f"ft.lighthouse={address}"]

    def start(i: int, heal: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "llama3.train", *base, *group_settings(i, heal)],
                                env=replica_env())

    def start_spare() -> subprocess.Popen:  # llama3.train.serve_as_spare
        return subprocess.Popen([sys.executable, "-c", "import sys; from llama3.train import serve_as_spare; "
                                 "serve_as_spare(sys.argv[1:])", *base], env=replica_env(), stdin=subprocess.PIPE,
                                text=True)

    here = range(ft.replicas) if ft.groups is None else ft.groups
    print(f"torchft lighthouse {address}; replica groups {list(here)} of {ft.replicas} here -> {run_dir}",
          file=sys.stderr, flush=True)
    procs = {i: start(i, heal=False) for i in here}
    spares = [start_spare() for _ in range(ft.spares)]
    restarts = 0
    try:
        while procs:
            time.sleep(0.05)
            for i, p in list(procs.items()):
                code = p.poll()
                if code is None:
                    continue
                del procs[i]
                if code == 0:
                    continue
                restarts += 1
                if restarts > ft.max_restarts:
                    raise SystemExit(f"replica group {i} exited with code {code}; ft.max_restarts "
                                     f"({ft.max_restarts}) used up")
                # groups on other hosts may be alive to heal from; with none, the group reads the disk (ft_join)
                heal = bool(procs) or ft.groups is not None
                spare = next((s for s in spares if s.poll() is None), None) if heal else None
                events.action("relaunch", f"replica group {i} exited with code {code}; started again ("
                              + ("heals from a live peer" if heal else "no group left: from the newest checkpoint")
                              + (", in a spare process" if spare else "") + ")", replica=i, code=code, heal=heal,
                              spare=spare is not None)
                if spare is not None:
                    spare.stdin.write(json.dumps(group_settings(i, heal)) + "\n")
                    spare.stdin.close()
                    spares.remove(spare)
                    spares.append(start_spare())
                    procs[i] = spare
                else:
                    procs[i] = start(i, heal)
    finally:
        for p in list(procs.values()) + spares:
            p.kill()
        if server is not None:
            server.shutdown()


def group_settings(i: int, heal: bool) -> list[str]:
    return [f"ft.replica_id={i}"] + (["checkpoint.resume=false"] if heal else [])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llama3.train.ft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    lh = sub.add_parser("lighthouse", help="serve the quorum for replica groups started elsewhere")
    lh.add_argument("--bind", default="[::]:29510")
    lh.add_argument("--heartbeat-timeout-s", type=float, default=1.0)
    opts = ap.parse_args(argv)
    server = lighthouse(opts.bind, heartbeat_timeout_ms=int(opts.heartbeat_timeout_s * 1000))
    print(server.address(), flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
