"""Faults under torchrun with 2 ranks (CPU, gloo, DDP replicas): one run meets a killed rank, a flipped parameter
bit, a corrupted latest checkpoint, a hung rank and a failing save, recovers from each with no one watching
(torchrun --max-restarts, the watchdog, checksums, fingerprints) and ends on the fault-free run's parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3.train.events import read_events
from llama3.weights import read_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.preset=debug-tiny", "data.dataset=synthetic", "data.seq_len=32", "training.batch_size=4",
          "training.steps=16", "optim.warmup_steps=2", "eval.every=-1", "metrics.peak_tflops=1",
          "metrics.tensorboard=false", "metrics.plot=false", "parallel.dp_replicate=2", "checkpoint.every=3",
          "checkpoint.keep=2", "faults.fingerprint_every=1", "faults.watchdog_timeout_s=20"]
FAULTS = ["kill:step=5:rank=1", "bitflip:step=8:rank=1", "corrupt_checkpoint:step=11", "hang:step=13:rank=1",
          "fail_save:step=15"]


def torchrun(args: list[str], max_restarts: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "-m", "llama3.train", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_every_fault_is_recovered_unattended(tmp_path):
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    torchrun(COMMON + [f"run.dir={reference}"])
    torchrun(COMMON + [f"run.dir={faulty}", f"faults.inject={json.dumps(FAULTS)}"],
             max_restarts=4)
    a, b = read_checkpoint(reference / "model").state_dict, read_checkpoint(faulty / "model").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    fired = sorted(p.name.split("-")[2] for p in (faulty / "faults").iterdir())
    assert fired == ["bitflip", "corrupt_checkpoint", "fail_save", "fail_save", "hang", "kill"]  # once each
    events = (faulty / "events.log").read_text()
    assert "parameter fingerprints of data-parallel replicas differ" in events
    assert "does not match its checksum" in events
    assert "checkpoint of step 15 failed" in events
    assert any((faulty / f"hang-rank{r}.txt").exists() for r in (0, 1))
    summary = json.loads((faulty / "goodput.json").read_text())["summary"]
    assert summary["restarts"] == 3 and summary["rollbacks"] == 1  # kill, corrupt checkpoint, hang; bit flip
    assert 0 < summary["goodput"] < 1

    # the record names the rank that died (the other was stopped by torchrun and said so), each hung rank, the
    # replicas that disagreed, the bad checkpoint; every start says where it resumed from
    record = read_events(faulty)
    faults = [(e["kind"], e["step"], e["rank"]) for e in record if e["event"] == "fault"]
    assert ("process_died", "5", "1") in faults and ("process_died", "11", "0") in faults
    assert sum(kind == "process_died" for kind, _, _ in faults) == 2
    assert ("replica_mismatch", "8", "0,1") in faults
    assert {rank for kind, step, rank in faults if kind == "hang"} <= {"0", "1"}
    assert any(kind == "hang" and step == "13" for kind, step, _ in faults)
    assert any(kind == "corrupt_checkpoint" for kind, _, _ in faults)
    starts = [e for e in record if e["event"] == "start"]
    assert len(starts) == 4 and starts[0]["resumed"] == "fresh" and all(s["resumed"] != "fresh" for s in starts[1:])
    recovered = {e["kind"] for e in record if e["event"] == "recovered"}
    assert {"process_died", "replica_mismatch", "hang", "corrupt_checkpoint", "save_failed"} <= recovered
