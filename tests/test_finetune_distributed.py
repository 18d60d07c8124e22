"""Fine-tuning under torchrun (2 CPU processes over gloo) in the layouts pretraining uses (FSDP, DDP, tensor
parallel) computes what one process computes, and a run resumes from its checkpoint exactly."""

import json
import os
import subprocess
import sys

import pytest

from llama3.finetune import finetune

QUICK = ["training.batch_size=4", "training.log_every=1", "optim.warmup_steps=2", "eval.every=2", "eval.steps=2",
         "data.val_fraction=0.03", "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
         "data.seq_len=64", "training.steps=3", "optim.lr=1e-2", "lora.dropout=0"]


def metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("margin")) for r in records]


def assert_same_metrics(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra[0] == rb[0]
        for x, y in zip(ra[1:], rb[1:]):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-5), (ra, rb)


@pytest.mark.parametrize("setup", [
    ["--method", "lora", "data.packing=true", "training.micro_batch_size=1"],  # FSDP: 2 ranks x 2 accumulation
    ["--method", "lora", "parallel.dp_replicate=2"],  # DDP
    ["--method", "lora", "parallel.tp=2"],  # tensor parallel: adapters laid out like their base layers
    ["--method", "qlora"],
    ["--method", "full"],
    ["--dpo"],
    pytest.param(["--method", "full", "parallel.tp=2"], marks=pytest.mark.long),
    pytest.param(["--dpo", "parallel.tp=2"], marks=pytest.mark.long),
    pytest.param(["--method", "qlora", "parallel.dp_replicate=2", "data.packing=true"], marks=pytest.mark.long),
], ids=["fsdp-lora", "ddp-lora", "tp-lora", "fsdp-qlora", "fsdp-full", "fsdp-dpo", "tp-full", "tp-dpo", "ddp-qlora"])
def test_two_processes_match_one(tiny_model_dir, tmp_path, setup):
    flags = [a for a in setup if a.startswith("--") or a in ("lora", "qlora", "full")]
    overrides = [a for a in setup if a not in flags]
    kwargs = {"method": flags[1]} if "--method" in flags else {"dpo": True}
    single = [o for o in overrides if not o.startswith("parallel.")]
    finetune([*QUICK, *single], model=str(tiny_model_dir), out=str(tmp_path / "one"), **kwargs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llama3.finetune", "--model", str(tiny_model_dir), "--out", str(tmp_path / "two"), *flags, *QUICK,
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    output = "model" if "full" in flags else "adapter"
    assert (tmp_path / "two" / output).is_dir()


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    settings = [*QUICK, "training.steps=4", "checkpoint.every=2", "eval.every=0"]
    whole = finetune(settings, model=str(tiny_model_dir), out=str(tmp_path / "whole"))
    finetune([*settings, "training.steps=2"], model=str(tiny_model_dir), out=str(tmp_path / "split"))
    rest = finetune(settings, model=str(tiny_model_dir), out=str(tmp_path / "split"))
    assert len(rest.losses) == 2  # steps 3 and 4, from the checkpoint of step 2
    assert all(abs(a - b) < 1e-5 for a, b in zip(rest.losses, whole.losses[2:])), (rest.losses, whole.losses)
