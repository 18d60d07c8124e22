"""Fault tolerance: atomic checksummed checkpoints, the loss guard, rollback, the watchdog, replica fingerprints and
the injector. Each injected fault must be recovered with no one watching, ending on the parameters of the
fault-free run. One process here; tests/test_faults_distributed.py does the same under torchrun with 2 ranks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llama3.train import train
from llama3.train import checkpoint as checkpoint_module
from llama3.train.checkpoint import Checkpointer, ModelState, young_daly_interval_s
from llama3.train.config import ConfigError, load_config
from llama3.train.events import read_events
from llama3.train.faults import (HANG_EXIT_CODE, LossGuard, corrupt_file, flip_bit, parameter_fingerprint,
                                 parse_faults)
from llama3.train.metrics import read_jsonl
from llama3.train.report import format_report, summarize
from llama3.weights import read_checkpoint

pytestmark = pytest.mark.timeout(300)

TINY = ["model.preset=debug-tiny", "data.dataset=synthetic", "data.seq_len=32", "training.batch_size=4",
        "training.steps=8", "optim.warmup_steps=2", "eval.every=-1", "metrics.peak_tflops=1",
        "metrics.tensorboard=false", "metrics.plot=false", "checkpoint.every=2", "checkpoint.keep=2"]


def final_params(run_dir) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "model").state_dict


def lines(run_dir, event: str, **fields) -> list[dict]:
    """The events.log records of one event whose fields have these values."""
    return [e for e in read_events(run_dir) if e["event"] == event
            and all(e.get(k) == str(v) for k, v in fields.items())]


def run_module(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama3.train", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    run = tmp_path_factory.mktemp("fault-free")
    losses = train(TINY + [f"run.dir={run}"])
    return run, losses


# ---- checkpoints -------------------------------------------------------------------------------------------------

def test_checkpoints_commit_with_a_manifest(fault_free):
    run, _ = fault_free
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    assert (ckpts / "latest").read_text().strip() == "step-00000008"
    manifest = json.loads((ckpts / "step-00000008" / "manifest.json").read_text())
    assert manifest["step"] == 8 and any(name.endswith(".distcp") for name in manifest["files"])
    goodput = json.loads((run / "goodput.json").read_text())["summary"]
    assert 0 < goodput["goodput"] < 1 and goodput["restarts"] == 0


def test_corrupt_or_partial_checkpoints_never_count(fault_free, tmp_path):
    run, _ = fault_free
    import shutil
    shutil.copytree(run / "checkpoints", tmp_path / "c")
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(tmp_path / "c", {"model": ModelState([model])}, log=lambda m, **fields: None)
    assert checkpointer.verify(8) is None
    corrupt_file(checkpointer.path(8))
    assert "checksum" in checkpointer.verify(8)
    (tmp_path / "c" / "step-00000009").mkdir()  # a save killed before its manifest was written
    (tmp_path / "c" / ".tmp-step-00000010").mkdir()  # a save killed while writing
    assert checkpointer.complete_steps() == [6, 8]
    assert checkpointer.newest_valid_step() == 6
    assert (tmp_path / "c" / "corrupt-step-00000008").is_dir() and checkpointer.complete_steps() == [6]


def test_resume_is_bit_identical_after_a_kill(fault_free, tmp_path):
    """SIGKILL before step 6 (checkpoints at 2 and 4), start again: the same losses and final parameters."""
    run, losses = fault_free
    killed = run_module(TINY + [f"run.dir={tmp_path}", "faults.inject=['kill:step=6']"])
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train(TINY + [f"run.dir={tmp_path}"])
    assert resumed == losses[4:]
    assert_same_params(final_params(tmp_path), final_params(run))
    assert json.loads((tmp_path / "goodput.json").read_text())["summary"]["restarts"] == 1

    # the record: both starts with what they resumed from, the death found at the restart, its recovery
    assert [e["resumed"] for e in lines(tmp_path, "start")] == ["fresh", "step-00000004"]
    [died] = lines(tmp_path, "fault", kind="process_died", step=6, rank=0)
    assert lines(tmp_path, "action", kind="restart", resumed="step-00000004")
    [recovered] = lines(tmp_path, "recovered", kind="process_died", fault_step=6)
    assert 0 < float(recovered["duration_s"]) < 120
    # metrics.jsonl: wall-clock time on every record, step 5 ran twice and the second run is marked
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert [r["step"] for r in records if r.get("replayed")] == [5]
    assert all(a["time"] <= b["time"] for a, b in zip(records, records[1:]))
    report = summarize(tmp_path)
    assert report["finished"] and report["replayed_steps"] == 1 and report["starts"] == 2
    assert [(f["kind"], f["step"]) for f in report["faults"]] == [("process_died", "6")]
    assert "process_died" in format_report(report) and 0 < report["goodput"] < 1


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failing_save_keeps_training_and_the_previous_checkpoint(fault_free, tmp_path, async_save):
    run, losses = fault_free
    got = train(TINY + [f"run.dir={tmp_path}", "faults.inject=['fail_save:step=4']",
                        f"checkpoint.async_save={str(async_save).lower()}"])
    assert got == losses
    assert "checkpoint of step 4 failed" in (tmp_path / "events.log").read_text()
    assert lines(tmp_path, "fault", kind="save_failed", step=4) and lines(tmp_path, "recovered", kind="save_failed")
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert_same_params(final_params(tmp_path), final_params(run))


def test_a_failing_final_save_is_written_again(fault_free, tmp_path):
    run, losses = fault_free
    assert train(TINY + [f"run.dir={tmp_path}", "faults.inject=['fail_save:step=8']"]) == losses
    assert lines(tmp_path, "fault", kind="save_failed", step=8) and lines(tmp_path, "action", kind="retry", step=8)
    assert lines(tmp_path, "recovered", kind="save_failed")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000008"


# ---- the loss guard ----------------------------------------------------------------------------------------------

def test_a_nan_step_is_skipped(tmp_path):
    reference = tmp_path / "reference"
    train(TINY + [f"run.dir={reference}", "faults.skip_steps=[5]"])
    faulty = tmp_path / "faulty"
    train(TINY + [f"run.dir={faulty}", "faults.inject=['nan:step=5']"])
    assert "step 5: non-finite loss" in (faulty / "events.log").read_text()
    assert lines(faulty, "fault", kind="non_finite", step=5, rank="all")
    assert lines(faulty, "action", kind="skip_step", step=5)
    assert lines(faulty, "recovered", kind="non_finite", fault_step=5, step=6)
    assert_same_params(final_params(faulty), final_params(reference))


def test_nans_in_a_row_roll_back_and_skip_the_window(tmp_path):
    reference = tmp_path / "reference"
    train(TINY + [f"run.dir={reference}", "faults.skip_steps=[5, 6]"])
    faulty = tmp_path / "faulty"
    train(TINY + [f"run.dir={faulty}", "faults.max_bad_steps=2",
                  "faults.inject=['nan:step=5', 'nan:step=6']"])
    events = (faulty / "events.log").read_text()
    assert "rolled back to the checkpoint of step 4 (from memory)" in events
    assert len(lines(faulty, "fault", kind="non_finite")) == 2
    assert lines(faulty, "action", kind="rollback", step=6, to="step-00000004")
    assert json.loads((faulty / "skip_steps.json").read_text()) == [5, 6]
    assert_same_params(final_params(faulty), final_params(reference))


def test_a_nan_rollback_restores_the_copy_in_ram_and_reads_no_disk(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(TINY + [f"run.dir={reference}", "checkpoint.every=0", "faults.skip_steps=[5, 6]"])

    def no_disk(*args, **kwargs):
        raise AssertionError("the rollback read a checkpoint from disk")
    monkeypatch.setattr(checkpoint_module.dcp, "load", no_disk)
    faulty = tmp_path / "faulty"
    train(TINY + [f"run.dir={faulty}", "checkpoint.every=0", "checkpoint.memory_every=4", "faults.max_bad_steps=2",
                  "faults.inject=['nan:step=5', 'nan:step=6']"])
    assert lines(faulty, "action", kind="rollback", step=6, to="step-00000004", source="memory")
    assert not list((faulty / "checkpoints").glob("step-0000000[1-7]"))  # nothing on disk before the end
    assert_same_params(final_params(faulty), final_params(reference))


def test_young_daly_interval_from_a_known_save_cost(tmp_path):
    assert young_daly_interval_s(0.5, 100.0) == pytest.approx(10.0)  # sqrt(2 x 0.5 s x 100 s)
    assert young_daly_interval_s(2.0, 3600.0) == pytest.approx(120.0)
    with pytest.raises(ValueError):
        young_daly_interval_s(1.0, 0.0)
    assert load_config(None, ["checkpoint.every=auto"]).checkpoint.every == "auto"
    with pytest.raises(ConfigError, match="checkpoint.every"):
        load_config(None, ["checkpoint.every=sometimes"])
    # faults rare against the save cost: the interval is longer than the run, so the first save (which measures
    # the cost) and the final one are all; faults all the time: a save after every step
    rare, often = tmp_path / "rare", tmp_path / "often"
    train(TINY + [f"run.dir={rare}", "checkpoint.every=auto", "faults.mtbf_minutes=1e6", "checkpoint.keep=8",
                  "checkpoint.export=false"])
    assert Checkpointer(rare / "checkpoints", {}).complete_steps() == [1, 8]
    train(TINY + [f"run.dir={often}", "checkpoint.every=auto", "faults.mtbf_minutes=1e-9", "checkpoint.keep=8",
                  "checkpoint.export=false"])
    assert Checkpointer(often / "checkpoints", {}).complete_steps() == list(range(1, 9))


def test_loss_guard_spikes():
    guard = LossGuard(zscore=4, window=5)
    for loss in (3.0, 2.9, 3.1, 3.0, 2.95):
        assert guard.check(loss, 1.0) is None
    assert "spike" in guard.check(9.0, 1.0)
    assert guard.check(3.05, 1.0) is None  # the spike did not enter the statistics
    assert "non-finite" in guard.check(float("inf"), 1.0)
    assert "non-finite" in guard.check(3.0, float("nan"))
    assert guard.bad_in_a_row == 2


# ---- hangs, silent corruption, injector ------------------------------------------------------------------------

def test_watchdog_dumps_stacks_and_exits(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from llama3.train.faults import Watchdog
        dog = Watchdog(0.5, Path({str(tmp_path / 'hang.txt')!r}))
        def stuck_in_a_collective():
            time.sleep(30)
        stuck_in_a_collective()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == HANG_EXIT_CODE
    assert "stuck_in_a_collective" in result.stderr
    assert "stuck_in_a_collective" in (tmp_path / "hang.txt").read_text()


def test_a_hung_step_and_a_corrupt_checkpoint_are_recorded(fault_free, tmp_path):
    """A rank stuck before step 5: its watchdog dumps the stacks, records the hang and exits with its code; the
    next start finds the newest checkpoint (step 4) corrupted, uses step 2's and ends on the fault-free run."""
    run, _ = fault_free
    hung = run_module(TINY + [f"run.dir={tmp_path}", "faults.watchdog_timeout_s=5", "faults.inject=['hang:step=5']"])
    assert hung.returncode == HANG_EXIT_CODE, hung.stderr[-2000:]
    [hang] = lines(tmp_path, "fault", kind="hang", step=5, rank=0, phase="step 5")
    assert lines(tmp_path, "action", kind="exit", code=HANG_EXIT_CODE)
    corrupt_file(tmp_path / "checkpoints" / "step-00000004")
    train(TINY + [f"run.dir={tmp_path}"])
    assert lines(tmp_path, "fault", kind="corrupt_checkpoint", checkpoint="step-00000004")
    assert [e["resumed"] for e in lines(tmp_path, "start")] == ["fresh", "step-00000002"]
    assert {e["kind"] for e in lines(tmp_path, "recovered")} == {"hang", "corrupt_checkpoint"}
    [recovered] = lines(tmp_path, "recovered", kind="hang")
    assert float(recovered["duration_s"]) > 5  # from the hang's start: the watchdog's wait counts
    assert_same_params(final_params(tmp_path), final_params(run))


def test_a_hang_while_forming_the_process_group_is_caught(tmp_path):
    """Rank 0 of two waits for a peer that never comes: the start-up budget ends it like a hung step."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = subprocess.run([sys.executable, "-m", "llama3.train", *TINY, f"run.dir={tmp_path}",
                             "faults.startup_timeout_s=2"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == HANG_EXIT_CODE, result.stderr[-2000:]
    assert "in rendezvous and process group creation" in result.stderr
    assert "init_distributed" in (tmp_path / "hang-rank0.txt").read_text()  # the stack shows where it hung
    assert lines(tmp_path, "fault", kind="hang", phase="rendezvous and process group creation")


def test_a_flipped_bit_changes_the_fingerprint():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = parameter_fingerprint([model])
    assert parameter_fingerprint([model]) == before
    flip_bit([model])
    assert parameter_fingerprint([model]) != before


def test_fault_specs():
    faults = parse_faults(["kill:step=7:rank=1", "nan:step=3", "hang:step=2"])
    assert [(f.kind, f.step, f.rank) for f in faults] == [("kill", 7, 1), ("nan", 3, None), ("hang", 2, 0)]
    with pytest.raises(ConfigError, match="unknown fault kind 'explode'"):
        load_config(None, ["faults.inject=['explode:step=1']"])
    with pytest.raises(ConfigError, match="needs step=S"):
        parse_faults(["kill:rank=1"])
    with pytest.raises(ConfigError, match="faults.skip_steps\\[0\\] must be an integer"):
        load_config(None, ["faults.skip_steps=['x']"])


def test_export_to_meta_layout(fault_free, tmp_path):
    run, _ = fault_free
    train(TINY + [f"run.dir={tmp_path}", "checkpoint.export_layout=meta"])
    assert (tmp_path / "model" / "consolidated.00.pth").exists()
    assert_same_params(final_params(tmp_path), final_params(run))


def test_taking_the_state_of_a_fresh_optimizer_leaves_it_fresh():
    """DCP gives an optimizer that has not stepped a zero step (Adam's count 1); a snapshot taken then must not
    change the updates that follow."""
    from llama3.train.checkpoint import OptimizerState
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    OptimizerState([model], [opt]).state_dict()
    assert not opt.state
