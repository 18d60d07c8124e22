"""Peak memory and training speed of full fine-tuning, LoRA and QLoRA on the same model and data.

Each method runs in a fresh process (`python -m llama3.finetune`), so one run's memory cannot show up in
another's peak. Peak memory is measured from after setup: on CUDA the peak allocated memory, on CPU the peak
resident set of the process (which includes the Python runtime and libraries, ~0.4 GiB), with glibc told to map
large blocks directly so that freed memory leaves the resident set at once (the peak then measures live memory,
not the allocator's cache). Tokens per second exclude the first step.

    python benchmarks/bench_finetune.py                          # the default model, 6 steps of 8 x ~70 tokens
    python benchmarks/bench_finetune.py --steps 10 --extra training.activation_checkpointing=full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ["full", "lora", "qlora"]


def run(method: str, model: str, steps: int, batch_size: int, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "llama3.finetune", "--model", model, "--method", method, "--out", str(out),
           f"training.steps={steps}", f"training.batch_size={batch_size}", "training.log_every=1", "eval.every=-1",
           "checkpoint.export=false", "metrics.plot=false", "metrics.tensorboard=false", *extra]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--extra", nargs="*", default=[], help="more section.key=value settings for every run")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            results[method] = run(method, args.model, args.steps, args.batch_size, args.extra, Path(tmp) / method)
            r = results[method]
            print(f"{method:6} peak {r['peak_mem_gib']:.2f} GiB | model tensors {r['model_gib']:.3f} GiB | "
                  f"{r['tokens_per_s']:,.0f} tokens/s | loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
                  flush=True)
    print()
    print("| method | peak memory (GiB) | model tensors (GiB) | tokens/s | peak vs full | tokens/s vs full |")
    print("|---|---|---|---|---|---|")
    base = results.get("full")
    for method, r in results.items():
        mem = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}x" if base else "-"
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"| {method} | {r['peak_mem_gib']:.2f} | {r['model_gib']:.3f} | {r['tokens_per_s']:,.0f} | {mem} | "
              f"{speed} |")


if __name__ == "__main__":
    main()
