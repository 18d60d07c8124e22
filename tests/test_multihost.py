"""Multi-host training for real: hosts made of network namespaces joined by veth pairs to a bridge (in a namespace
of its own, so only these namespaces talk to each other), each running the documented multi-node torchrun command.
One host's link is cut mid-run and restored; another host is killed outright. The job goes on by itself on the
hosts that remain, takes a returning host back, and never loses a committed step. The same for torchft replica
groups on two hosts, where the survivor never restarts and the returning group heals from its memory. The hosts
are tests/netns.py's; they need root and iproute2."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from netns import Hosts

from llama3.train.events import read_events
from llama3.train.metrics import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 (network namespaces)")]
PORT = 29400  # inside the namespaces: nothing else listens there
STEPS = 160


def launch(h: Hosts, i: int, train_args: list[str], log: Path, nnodes: str) -> None:
    """Host i's torchrun, as docs/RELIABILITY.md gives it. GLOO_SOCKET_IFNAME is left for the trainer to pick."""
    h.procs[i] = h.run(i, [
        "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={h.addrs[0]}:{PORT}", "--rdzv-id=job",
        f"--rdzv-conf=is_host={str(i == 0).lower()},join_timeout=120,last_call_timeout=1,close_timeout=5,"
        "keep_alive_interval=1,keep_alive_max_attempt=3", f"--local-addr={h.addrs[i]}", "--max-restarts=20",
        "--monitor-interval=0.5", "-m", "llama3.train", *train_args], log)


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


def test_a_cut_link_is_survived_the_host_taken_back_and_a_killed_host_left_behind(hosts, tmp_path):
    """Two hosts; host 1's link goes down: host 0 goes on alone, and takes host 1 back once the link is up. Then
    host 1 is killed outright (launcher and worker): host 0 finishes the run alone."""
    h = hosts(2)
    run = tmp_path / "run"
    for i in range(2):
        launch(h, i, train_args(run, STEPS), tmp_path / f"host{i}.log", nnodes="1:2")
    wait_until("step 8", lambda: last_step(run) >= 8, h.procs)
    h.cut(1)
    wait_for_start(run, 1, 1, h.procs)  # host 0 alone
    alone = starts(run)[-1]["time"]
    wait_until("a step alone", lambda: any(r["time"] > alone for r in read_jsonl(run / "metrics.jsonl")), h.procs)
    h.restore(1)
    wait_for_start(run, 2, 2, h.procs)  # host 1 back
    back = starts(run)[-1]["time"]
    wait_until("steps with host 1 back", lambda: sum(r["time"] > back for r in read_jsonl(run / "metrics.jsonl")
                                                     if "loss" in r) >= 3, h.procs)
    assert last_step(run) < STEPS - 20, "the run ended before host 1 could be killed"
    h.kill(1)
    finish(h, [0], timeout=240)
    events = read_events(run)
    assert [e["world"] for e in starts(run)] == ["2", "1", "2", "1"]
    assert any(e["event"] == "fault" and e["kind"] == "hang" for e in events)  # the collective that never returned
    assert any(e["event"] == "action" and e["kind"] == "scale_up" for e in events)
    killed = [e for e in events if e["event"] == "fault" and e["kind"] == "process_died"]
    assert [e["host"] for e in killed] == ["host1"], killed
    # the cut link and the kill: each time the job went on without host 1, and said so
    assert [e["hosts"] for e in events if e["event"] == "action" and e["kind"] == "scale_down"] == ["host1"] * 2
    assert any(e["event"] == "recovered" and e["kind"] == "process_died" for e in events)
    assert events[-1]["event"] == "end" and events[-1]["step"] == str(STEPS)
    committed_steps_never_lost(run)


@pytest.mark.long
def test_three_hosts_a_cut_link_and_a_killed_host(hosts, tmp_path):
    """Three hosts: host 2's link is cut and restored, then host 1 is killed; hosts 0 and 2 finish the run."""
    h = hosts(3)
    run = tmp_path / "run"
    for i in range(3):
        launch(h, i, train_args(run, 200), tmp_path / f"host{i}.log", nnodes="2:3")
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
    assert [e["hosts"] for e in events if e["event"] == "action" and e["kind"] == "scale_down"] == ["host2", "host1"]
    assert events[-1]["event"] == "end" and events[-1]["step"] == "200"
    committed_steps_never_lost(run)


FT_STEPS = 300


def test_replica_groups_on_two_hosts_go_on_through_a_cut_link_and_heal(hosts, tmp_path):
    """torchft replica groups across hosts, with the commands docs/RELIABILITY.md gives: the lighthouse and group 0
    on host 0, group 1 on host 1, each under its host's `llama3 train` launcher. Host 1's link is cut mid-run:
    group 0 goes on alone in the same process; when the link is back group 1 rejoins and heals from group 0's
    memory. Every step is trained once."""
    pytest.importorskip("torchft")
    h = hosts(2)
    run = tmp_path / "run"
    h.start_replica_groups([
        "model.preset=debug-tiny", "data.dataset=synthetic", "data.seq_len=32", "training.batch_size=8",
        f"training.steps={FT_STEPS}", "optim.warmup_steps=2", "eval.every=-1", "metrics.peak_tflops=1",
        "metrics.tensorboard=false", "metrics.plot=false", "checkpoint.export=false", "faults.watchdog_timeout_s=10",
        "faults.startup_timeout_s=90", "ft.timeout_s=2", "ft.spares=0", f"run.dir={run}"], tmp_path)
    wait_until("step 10", lambda: last_step(run) >= 10, h.procs, timeout=200)
    h.cut(1)
    cut_at = time.time()
    wait_until("steps without host 1", lambda: sum(r["time"] > cut_at + 4 for r in read_jsonl(run / "metrics.jsonl")
                                                   if "loss" in r) >= 10, h.procs)
    alone_until = last_step(run)
    assert alone_until < FT_STEPS - 30, "the run ended before host 1's link came back"
    h.restore(1)
    restored = time.time()
    finish(h, [0, 1], timeout=240)
    events = read_events(run)

    def of(event, **fields):
        return [e for e in events if e["event"] == event and all(e.get(k) == str(v) for k, v in fields.items())]

    group0 = of("start", replica=0)
    assert len(group0) == 1, group0  # group 0's process never restarted
    assert of("fault", kind="replica_lost", rank=1) and of("action", kind="shrink")
    assert of("recovered", kind="replica_lost")
    heal = of("action", kind="heal", replica=1)
    assert heal and int(heal[-1]["step"]) >= alone_until, (heal, alone_until)  # group 0's live step, not its own
    back_after = heal[-1]["time"] - restored
    print(f"group 0 went on {of('recovered', kind='replica_lost')[0]['duration_s']}s after the cut; group 1 healed "
          f"{back_after:.2f}s after the link came back, in {len(of('start', replica=1))} start(s)")
    assert 0 < back_after < 30, back_after
    assert of("action", kind="grow")
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert sorted(steps) == list(range(1, FT_STEPS + 1)), steps  # none lost, none trained twice
    assert of("end", step=FT_STEPS)
