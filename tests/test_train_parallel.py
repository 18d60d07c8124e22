"""Parallel layouts against one process: from the same seed checkpoint, every layout must give the same per-step
training loss (and validation loss) within 1e-5 in fp32. CPU, gloo, 2 and 4 processes under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama3.train import train
from llama3.weights import read_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# 4 layers so that interleaved 1F1B has 2 stages per rank; document masking so that positions and the mask travel
# through every layout; validation at step 3 and 6.
COMMON = ["model.preset=debug-tiny", "model.args.n_layers=4", "data.dataset=synthetic", "data.seq_len=32",
          "data.document_masking=true", "training.batch_size=4", f"training.steps={STEPS}", "optim.warmup_steps=2",
          "eval.every=3", "eval.steps=1", "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
          "checkpoint.export=false", "checkpoint.enabled=false"]

LAYOUTS = {  # name: (processes, overrides)
    "fsdp-with-accumulation": (2, ["parallel.dp_shard=2", "training.micro_batch_size=1"]),
    "ddp": (2, ["parallel.dp_replicate=2"]),
    "tp": (2, ["parallel.tp=2"]),
    "pp-1f1b": (2, ["parallel.pp=2"]),
    "pp-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4"]),
    "pp-interleaved-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b"]),
    "fsdp-tp": (4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    "tp-pp": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


def read_losses(run_dir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seed")
    train(COMMON + ["training.steps=0", "checkpoint.export=true", "eval.every=-1", f"run.dir={run}"])
    return run / "model"


@pytest.fixture(scope="module")
def single_process(seed_checkpoint, tmp_path_factory) -> tuple[list[float], list[float]]:
    run = tmp_path_factory.mktemp("single")
    train(COMMON + [f"model.init_from={seed_checkpoint}", f"run.dir={run}"])
    return read_losses(run)


def torchrun(nproc: int, args: list[str], timeout: float = 600) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llama3.train", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, seed_checkpoint, single_process, tmp_path):
    nproc, overrides = LAYOUTS[name]
    torchrun(nproc, COMMON + overrides + [f"model.init_from={seed_checkpoint}", f"run.dir={tmp_path}"])
    train_losses, val_losses = read_losses(tmp_path)
    expected_train, expected_val = single_process
    assert len(train_losses) == STEPS and len(val_losses) == 2
    assert train_losses == pytest.approx(expected_train, abs=1e-5, rel=0)
    assert val_losses == pytest.approx(expected_val, abs=1e-5, rel=0)
    assert expected_train[-1] < expected_train[0]  # the steps did change the model


def test_tensor_parallel_with_tied_embeddings_and_fresh_init(tmp_path):
    """Without a seed checkpoint: initialisation does not depend on the layout. Tied embeddings stay one parameter
    under TP, and the exported model is the same."""
    tied = COMMON + ["model.args.tie_embeddings=true", "checkpoint.export=true"]
    train(tied + [f"run.dir={tmp_path / 'single'}"])
    torchrun(2, tied + ["parallel.tp=2", f"run.dir={tmp_path / 'tp'}"])
    assert read_losses(tmp_path / "tp")[0] == pytest.approx(read_losses(tmp_path / "single")[0], abs=1e-5, rel=0)
    single = read_checkpoint(tmp_path / "single" / "model").state_dict
    sharded = read_checkpoint(tmp_path / "tp" / "model").state_dict
    assert sorted(single) == sorted(sharded)
    assert all((single[k] - sharded[k]).abs().max() < 1e-4 for k in single)
