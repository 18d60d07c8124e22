"""Multi-host training for real: hosts made of network namespaces joined by veth pairs to a bridge (in a namespace
of its own, so only these namespaces talk to each other), each running the documented multi-node torchrun command.
One host's link is cut mid-run and restored; another host is killed outright. The job goes on by itself on the
hosts that remain, takes a returning host back, and never loses a committed step. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llama3.train.events import read_events
from llama3.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 (network namespaces)")]
PORT = 29400  # inside the namespaces: nothing else listens there


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """n hosts 10.77.0.1.. on one bridge; host i's interface is eth0, its bridge port p<i>."""

    def __init__(self, n: int):
        self.tag = f"l3{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-h{i}" for i in range(n)]
        self.addrs = [f"10.77.0.{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n
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

    def launch(self, i: int, train_args: list[str], log: Path, nnodes: str) -> None:
        """Host i's torchrun, as docs/RELIABILITY.md gives it; its own host name (a UTS namespace) so the event
        record can tell the hosts apart. GLOO_SOCKET_IFNAME is left for the trainer to pick."""
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={self.addrs[0]}:{PORT}", "--rdzv-id=job",
                    f"--rdzv-conf=is_host={str(i == 0).lower()},join_timeout=120,last_call_timeout=1,"
                    "close_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3",
                    f"--local-addr={self.addrs[i]}", "--max-restarts=20", "--monitor-interval=0.5",
                    "-m", "llama3.train", *train_args]
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
                   PYTHONPATH=str(ROOT))
        env.pop("GLOO_SOCKET_IFNAME", None)
        cmd = ["ip", "netns", "exec", self.names[i], "unshare", "--uts", "sh", "-c",
               f'hostname host{i} && exec "$@"', "sh", *torchrun]
        self.procs[i] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                         start_new_session=True)

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
        for i, p in enumerate(self.procs):
            if p is not None:
                self.kill(i)
                p.wait(timeout=30)
        for name in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    made: list[Hosts] = []

    def make(n: int) -> Hosts:
        made.append(Hosts(n))
        return made[-1]

    yield make
    for h in made:
        h.close()


def train_args(run: Path, steps: int) -> list[str]:
    return ["model.preset=debug-tiny", "data.dataset=synthetic", "data.seq_len=32", "training.batch_size=12",
            f"training.steps={steps}", "optim.warmup_steps=2", "eval.every=-1", "metrics.peak_tflops=1",
            "metrics.tensorboard=false", "metrics.plot=false", "checkpoint.export=false", "checkpoint.every=5",
            "checkpoint.keep=2", "faults.watchdog_timeout_s=4", "faults.startup_timeout_s=90", f"run.dir={run}"]


def wait_until(what: str, done, procs, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        assert any(p.poll() is None for p in procs if p is not None), "every host's launcher has exited"
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def last_step(run: Path) -> int:
    return max((r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r), default=0)


def starts(run: Path) -> list[dict]:
    return [e for e in read_events(run) if e["event"] == "start"]


def wait_for_start(run: Path, world: int, after: int, procs) -> None:
    """Until a start with `world` processes follows the first `after` starts."""
    wait_until(f"a start with {world} processes", lambda: any(e["world"] == str(world) for e in starts(run)[after:]),
               procs)


def committed_steps_never_lost(run: Path) -> None:
    """Each start resumed from the newest checkpoint committed before it, and the run ended at its last step."""
    starts = [e for e in read_events(run) if e["event"] == "start"]
    resumed = [0 if s["resumed"] == "fresh" else int(s["resumed"].split("-")[1]) for s in starts]
    assert resumed == sorted(resumed), resumed
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    for s, r in zip(starts[1:], resumed[1:]):
        before = [x["step"] for x in records if x["time"] < s["time"]]
        assert max(before) - r <= 5, (s, r)  # at most the steps since the last checkpoint (every 5) replay


def finish(h: Hosts, survivors: list[int], timeout: float) -> None:
    for i in survivors:
        assert h.procs[i].wait(timeout=timeout) == 0, f"host {i}'s launcher failed"


def test_a_cut_link_is_survived_and_the_host_taken_back(hosts, tmp_path):
    """Two hosts; host 1's link goes down: host 0 goes on alone, and takes host 1 back once the link is up."""
    h = hosts(2)
    run = tmp_path / "run"
    for i in range(2):
        h.launch(i, train_args(run, 80), tmp_path / f"host{i}.log", nnodes="1:2")
    wait_until("step 8", lambda: last_step(run) >= 8, h.procs)
    h.cut(1)
    wait_for_start(run, 1, 1, h.procs)  # host 0 alone
    alone = starts(run)[-1]["time"]
    wait_until("a step alone", lambda: any(r["time"] > alone for r in read_jsonl(run / "metrics.jsonl")), h.procs)
    h.restore(1)
    wait_for_start(run, 2, 2, h.procs)  # host 1 back
    finish(h, [0, 1], timeout=240)
    events = read_events(run)
    assert [e["world"] for e in starts(run)][:3] == ["2", "1", "2"]
    assert any(e["event"] == "fault" and e["kind"] == "hang" for e in events)  # the collective that never returned
    assert any(e["event"] == "action" and e["kind"] == "scale_up" for e in events)
    assert events[-1]["event"] == "end" and events[-1]["step"] == "80"
    committed_steps_never_lost(run)


@pytest.mark.long
def test_three_hosts_a_cut_link_and_a_killed_host(hosts, tmp_path):
    """Three hosts: host 2's link is cut and restored, then host 1 is killed; hosts 0 and 2 finish the run."""
    h = hosts(3)
    run = tmp_path / "run"
    for i in range(3):
        h.launch(i, train_args(run, 200), tmp_path / f"host{i}.log", nnodes="2:3")
    wait_until("step 8", lambda: last_step(run) >= 8, h.procs)
    h.cut(2)
    wait_for_start(run, 2, 1, h.procs)
    h.restore(2)
    wait_for_start(run, 3, 2, h.procs)
    back = last_step(run)
    wait_until("steps with host 2 back", lambda: last_step(run) >= back + 10, h.procs)
    h.kill(1)
    finish(h, [0, 2], timeout=300)
    events = read_events(run)
    assert [e["world"] for e in starts(run)] == ["3", "2", "3", "2"]
    assert any(e["event"] == "fault" and e["kind"] == "process_died" and e["host"] == "host1" for e in events)
    assert events[-1]["event"] == "end" and events[-1]["step"] == "200"
    committed_steps_never_lost(run)
