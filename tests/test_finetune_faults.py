"""Fine-tuning runs in the training loop, so it meets faults as pretraining does: a NaN step is skipped, a killed
run resumes from its newest valid checkpoint (past a corrupted one), and each ends on the fault-free run's
adapter. Old run directories whose checkpoints this version cannot continue fail with a message."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llama3.finetune import finetune
from llama3.train.checkpoint import Checkpointer, CheckpointMismatch

pytestmark = pytest.mark.timeout(300)

QUICK = ["training.batch_size=4", "training.log_every=1", "optim.warmup_steps=2", "eval.every=-1",
         "data.val_fraction=0.03", "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
         "data.seq_len=64", "training.steps=6", "optim.lr=1e-2", "checkpoint.every=2", "lora.rank=4"]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter.safetensors")


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fault_free(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fault-free")
    finetune(QUICK, model=str(tiny_model_dir), out=str(run))
    return run


def test_a_nan_step_is_skipped(tiny_model_dir, tmp_path):
    finetune([*QUICK, "faults.skip_steps=[3]"], model=str(tiny_model_dir), out=str(tmp_path / "reference"))
    finetune([*QUICK, "faults.inject=['nan:step=3']"], model=str(tiny_model_dir), out=str(tmp_path / "faulty"))
    assert "step 3: non-finite loss" in (tmp_path / "faulty" / "events.log").read_text()
    assert_same(adapter(tmp_path / "faulty"), adapter(tmp_path / "reference"))


def test_a_killed_run_resumes_past_a_corrupted_checkpoint(tiny_model_dir, fault_free, tmp_path):
    """Killed before step 5 (checkpoints at 2 and 4); restarted, it corrupts the checkpoint of step 4 and is
    killed again; the third start finds the damage, goes back to step 2 and ends where the fault-free run did."""
    faults = ["faults.inject=['kill:step=5', 'corrupt_checkpoint:step=5']"]
    cmd = [sys.executable, "-m", "llama3.finetune", "--model", str(tiny_model_dir), "--out", str(tmp_path), *QUICK,
           *faults]
    for _ in range(2):
        killed = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = finetune([*QUICK, *faults], model=str(tiny_model_dir), out=str(tmp_path))
    assert len(resumed.losses) == 4  # steps 3 to 6, from the checkpoint of step 2
    assert "does not match its checksum" in (tmp_path / "events.log").read_text()
    assert_same(adapter(tmp_path), adapter(fault_free))


class _OldProgress:
    """The progress record fine-tuning checkpoints held before fine-tuning ran in the training loop."""

    def state_dict(self):
        return {"step": 2, "scheduler": {"last_epoch": 2}, "data": {"step": 2}}

    def load_state_dict(self, state):
        pass


def test_an_old_run_directory_fails_with_a_message(tiny_model_dir, tmp_path):
    Checkpointer(tmp_path / "checkpoints", {"progress": _OldProgress()}, log=lambda m: None).save(2)
    with pytest.raises(CheckpointMismatch, match="cannot be continued by this version"):
        finetune(QUICK, model=str(tiny_model_dir), out=str(tmp_path))
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()  # not taken for a corrupt one
