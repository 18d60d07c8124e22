"""torchft replica groups inside `llama3 train` (ft.replicas): a killed group is dropped from the quorum while the
others go on in the same processes, and it comes back healed from a live peer's memory; every step is trained."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama3.train.events import read_events
from llama3.train.metrics import read_jsonl

pytest.importorskip("torchft")
pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def test_a_killed_replica_group_heals_from_a_live_peer_and_the_survivor_never_restarts(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama3.train", "model.preset=debug-tiny", "data.dataset=synthetic",
           "data.seq_len=64", "training.batch_size=8", f"training.steps={STEPS}", "optim.warmup_steps=2",
           "eval.every=-1", "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
           "checkpoint.every=0", "checkpoint.export=false", "ft.replicas=2", "ft.timeout_s=2",
           "faults.fingerprint_every=2",  # from the first step on, the groups hold the same parameters
           "faults.inject=['kill:step=4:rank=1']", f"run.dir={run}"]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=140)
    assert result.returncode == 0, result.stderr[-5000:]
    events = read_events(run)

    def of(event, **fields):
        return [e for e in events if e["event"] == event and all(e.get(k) == str(v) for k, v in fields.items())]

    # the survivor started once and ran to the end in that process; the killed group started twice
    starts = {r: [e["pid"] for e in of("start", replica=r)] for r in (0, 1)}
    assert len(starts[0]) == 1 and len(starts[1]) == 2 and starts[1][0] != starts[1][1], starts
    assert of("action", kind="relaunch", replica=1, code=-9)
    # the survivors' view: group 1 left the quorum and training went on without it, within seconds
    lost = of("fault", kind="replica_lost", rank=1) + of("fault", kind="step_failed")
    assert lost, events
    recovered = [e for e in of("recovered") if e["kind"] in ("replica_lost", "step_failed")]
    assert recovered and all(0 < float(e["duration_s"]) < 10 for e in recovered), recovered
    # (a spare may be back before the survivor's next quorum: then the failed step simply runs again with both)
    assert of("action", kind="shrink") or of("action", kind="retry")
    # the killed group's view: it died (seen at its restart) and copied a live peer's state, no checkpoint read
    assert of("fault", kind="process_died", rank=1)
    heal = of("action", kind="heal", replica=1)
    assert heal and int(heal[-1]["step"]) >= 3, events  # the peers' live step (3 committed), not step 0
    assert not (run / "checkpoints").exists() or not any(p.name.startswith("step-") and int(p.name[5:]) < STEPS
                                                         for p in (run / "checkpoints").iterdir())
    assert of("start", replica=1, resumed="peer")
    assert of("recovered", kind="process_died")
    # no step was lost or trained twice: every step 1..STEPS once in the metrics, none replayed
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert sorted(set(steps)) == list(range(1, STEPS + 1)) and not any(
        r.get("replayed") for r in read_jsonl(run / "metrics.jsonl")), steps
    assert of("end", step=STEPS)
    assert not of("fault", kind="replica_mismatch"), events


def test_across_hosts_a_group_is_reached_at_ft_host(monkeypatch):
    """The heal is fetched from the address a group advertises: ft.host, not this host's name (which the other
    hosts may not resolve); gloo binds the interface that holds ft.host, and an ft.host of no interface here is an
    error naming it."""
    from datetime import timedelta

    from llama3.train.config import ConfigError
    from llama3.train.ft import transport_at, use_interface_of
    transport = transport_at("10.1.2.3", timedelta(seconds=1))
    try:
        assert transport.address().startswith("http://10.1.2.3:") and transport.address().endswith("/checkpoint/")
    finally:
        transport.shutdown(wait=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    use_interface_of("127.0.0.1")  # one host: gloo's default is right
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    with pytest.raises(ConfigError, match="ft.host 192.0.2.77 is not an address of this host"):
        use_interface_of("192.0.2.77")
