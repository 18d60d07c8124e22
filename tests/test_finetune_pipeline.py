"""Pipeline-parallel fine-tuning (2 stages under torchrun, CPU, gloo) computes what one process computes, and a
pipelined run whose second stage is killed mid-run is restarted by torchrun, resumes from its checkpoint and ends
on the uninterrupted run's adapter, bit for bit. A pipeline needs untied embeddings (the first and last stage
would share the weight): the model here has its own output projection."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_chat_model
from safetensors.torch import load_file

from llama3.finetune import finetune
from llama3.finetune.config import load_finetune_config
from llama3.train.config import ConfigError, resolve_layout
from llama3.train.events import read_events
from llama3.weights import read_checkpoint

pytestmark = pytest.mark.timeout(300)

STEPS = 4
QUICK = ["training.batch_size=4", "training.log_every=1", "optim.warmup_steps=2", "eval.every=2", "eval.steps=1",
         "data.val_fraction=0.03", "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
         "data.seq_len=96", f"training.steps={STEPS}", "optim.lr=1e-2", "checkpoint.every=2", "lora.rank=4"]
PIPELINE = ["parallel.pp=2"]  # 1F1B, one micro-batch of 2 conversations per stage


def torchrun(model, out, *args, max_restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           f"--max-restarts={max_restarts}", "-m", "llama3.finetune", "--model", str(model), "--out", str(out),
           *QUICK, *PIPELINE, *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def losses(run_dir):
    """(step, training loss) and (step, validation loss), the last record of each step (a restart repeats some)."""
    train, val = {}, {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        (train if "loss" in r else val)[r["step"]] = r.get("loss", r.get("val_loss"))
    return train, val


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter.safetensors")


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, default_gguf_path):
    return save_tiny_chat_model(tmp_path_factory.mktemp("untied"), default_gguf_path, tie_embeddings=False)


@pytest.fixture(scope="module")
def single_process(untied_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    finetune(QUICK, model=str(untied_model_dir), out=str(run))
    return run


@pytest.fixture(scope="module")
def pipelined(untied_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("pipelined")
    (run / "stdout.txt").write_text(torchrun(untied_model_dir, run).stdout)
    return run


def test_lora_pipeline_matches_one_process(single_process, pipelined):
    """Losses within 1e-5 (fp32; only the order of summation differs); the adapter gathered from both stages
    holds every layer, within 1e-4 of one process's after 4 AdamW steps."""
    one, two = losses(single_process), losses(pipelined)
    assert list(one[0]) == list(range(1, STEPS + 1)) and list(one[1]) == [0, 2, STEPS]
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    assert one[0][STEPS] < one[0][1]  # it did learn
    a, b = adapter(single_process), adapter(pipelined)
    assert a.keys() == b.keys() and {k.split(".")[1] for k in a} == {"0", "1"}
    assert all((a[k] - b[k]).abs().max() < 1e-4 for k in a)
    assert (pipelined / "stdout.txt").read_text().count("peak memory") == 1  # rank 0 alone sums up
    assert json.loads((pipelined / "summary.json").read_text())["output"] == str(pipelined / "adapter")


def test_a_killed_stage_resumes_and_ends_on_the_uninterrupted_adapter(untied_model_dir, pipelined, tmp_path):
    """Rank 1 (the last stage) is SIGKILLed before step 3; torchrun restarts both ranks, which resume from the
    checkpoint of step 2 and end where the uninterrupted pipelined run did."""
    torchrun(untied_model_dir, tmp_path, "faults.inject=['kill:step=3:rank=1']", max_restarts=1)
    record = read_events(tmp_path)
    assert ("process_died", "3", "1") in [(e["kind"], e["step"], e["rank"]) for e in record if e["event"] == "fault"]
    assert [e["resumed"] for e in record if e["event"] == "start"] == ["fresh", "step-00000002"]
    assert losses(tmp_path) == losses(pipelined)
    a, b = adapter(tmp_path), adapter(pipelined)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.long
@pytest.mark.parametrize("method", ["full", "qlora"])
def test_full_and_qlora_pipelines_match_one_process(untied_model_dir, tmp_path, method):
    """QLoRA with packing: the positions restarting at each example and the mask travel through the stages."""
    settings = [f"method={method}", "checkpoint.enabled=false", "eval.every=0",
                f"data.packing={str(method == 'qlora').lower()}"]
    finetune([*QUICK, *settings], model=str(untied_model_dir), out=str(tmp_path / "one"))
    torchrun(untied_model_dir, tmp_path / "two", *settings)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    if method == "full":
        a, b = (read_checkpoint(tmp_path / run / "model").state_dict for run in ("one", "two"))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


def test_tied_embeddings_and_dpo_are_refused_under_a_pipeline(tiny_model_dir):
    cfg = load_finetune_config(None, [*QUICK, *PIPELINE])
    tied = read_checkpoint(tiny_model_dir).args
    assert tied.tie_embeddings
    with pytest.raises(ConfigError, match="parallel.pp > 1 needs untied embeddings"):
        resolve_layout(cfg, 2, tied)
    with pytest.raises(ConfigError, match="DPO does not run pipelined"):
        load_finetune_config(None, [*QUICK, *PIPELINE], **{"dpo.enabled": True})
