"""MFU of the trainer on one GPU: the Llama-3.2-1B shape in bf16, per-block torch.compile, FSDP2 (a one-rank mesh,
as in a multi-GPU run), synthetic data. Runs in a few minutes and prints the per-step numbers and a summary.

    python benchmarks/gpu_train_check.py                     # defaults below
    python benchmarks/gpu_train_check.py training.steps=30 data.seq_len=4096 training.batch_size=4

MFU is reported against the device's peak measured with a large bf16 matmul at start and, when the device is known,
against its datasheet dense bf16 peak.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama3.train.config import load_config
from llama3.train.pretrain import Pretraining
from llama3.train.trainer import Trainer

DATASHEET_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0, "B200": 2250.0}  # dense, no sparsity

WARMUP_STEPS = 5  # compilation and allocator warm-up; excluded from the summary

DEFAULTS = ["model.preset=llama3.2-1b", "data.dataset=synthetic", "data.seq_len=8192", "training.batch_size=2",
            "training.steps=25", "training.dtype=bfloat16", "training.compile=true", "optim.warmup_steps=5",
            "parallel.dp_shard=1", "eval.every=-1", "checkpoint.enabled=false", "checkpoint.export=false",
            "metrics.tensorboard=false", "metrics.plot=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_train_check: no CUDA device", file=sys.stderr)
        return 1
    # A one-process torchrun environment, so the trainer builds a mesh and applies FSDP as it would on many GPUs.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_train_check-"))
    cfg = load_config(None, DEFAULTS + [f"run.dir={run_dir}"] + argv)
    start = time.perf_counter()
    trainer = Trainer(cfg, Pretraining(cfg))
    try:
        trainer.fit()
    finally:
        trainer.close()
    wall = time.perf_counter() - start

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "mfu" in r and r["step"] > WARMUP_STEPS]
    if not steps:
        print(f"gpu_train_check: need more than {WARMUP_STEPS} steps to summarise", file=sys.stderr)
        return 1
    mfu = statistics.median(r["mfu"] for r in steps)
    tflops = statistics.median(r["tflops_per_device"] for r in steps)
    tokens = statistics.median(r["tokens_per_s"] for r in steps)
    name = torch.cuda.get_device_name()
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    print(f"\n{name}: {cfg.model.preset}, {cfg.training.batch_size} x {cfg.data.seq_len} tokens per step, "
          f"{trainer.dtype}, compile={cfg.training.compile}, FSDP on a {trainer.world_size}-rank mesh")
    print(f"median over steps {WARMUP_STEPS + 1}-{cfg.training.steps}: {tokens:,.0f} tokens/s, "
          f"{tflops:.1f} TFLOP/s, MFU {100 * mfu:.1f}% of the measured peak "
          f"({trainer.peak_flops / 1e12:.0f} TFLOP/s)")
    if datasheet:
        print(f"MFU against the datasheet's dense bf16 peak ({datasheet:.0f} TFLOP/s): {100 * tflops / datasheet:.1f}%")
    print(f"peak memory {max(r['peak_mem_gib'] for r in steps):.1f} GiB, loss {steps[0]['loss']:.3f} -> "
          f"{steps[-1]['loss']:.3f}, whole run {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
