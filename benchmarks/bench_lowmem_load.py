"""Low-memory loading of a large checkpoint: a Llama 3 8B-shaped model in bf16 (16 GB) on a 24 GB machine.

    python benchmarks/bench_lowmem_load.py                   # writes /tmp/llama3-8b-random (16 GB), loads it, deletes it
    python benchmarks/bench_lowmem_load.py --preset llama3.2-1b --keep

It writes a Hugging Face-layout checkpoint of random bf16 weights (a few tensors in memory at a time), then, in a
fresh process, loads it the way `llama3.load` does (safetensors memory-mapped, the model built on the meta device
and adopting the mapped tensors) and runs one short forward pass. It reports time and memory of each phase:
resident memory (RSS) includes the checkpoint's file pages as they are touched (the kernel can drop and re-read
those), anonymous memory is what the process itself allocated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llama3.args import ModelArgs  # noqa: E402

SHARD_BYTES = 2 << 30


def write_random_checkpoint(path: Path, args: ModelArgs) -> int:
    """HF layout with random bf16 weights, written shard by shard; returns the bytes written."""
    from safetensors.torch import save_file

    from llama3.model import Transformer
    from llama3.weights.hf import config_from_args, hf_name
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("output.weight")
    path.mkdir(parents=True, exist_ok=True)
    pool = torch.randn(64 << 20, dtype=torch.bfloat16) * 0.02  # slices of one random block: fast to make
    weight_map, current, size = {}, {}, 0

    def flush():
        shard = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(current, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(current, shard))
        current.clear()

    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        start = int(torch.randint(0, pool.numel() - min(numel, pool.numel()) + 1, ()))
        flat = pool[start:start + numel] if numel <= pool.numel() else pool.repeat(-(-numel // pool.numel()))[:numel]
        current[hf_name(name)] = flat.reshape(shape).clone()
        size += numel * 2
        if size >= SHARD_BYTES:
            flush()
            size = 0
    if current:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config_from_args(args, torch.bfloat16), indent=2))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: Path, forward_tokens: int) -> dict:
    """In this (fresh) process: load as llama3.load does, then a short forward pass."""
    from llama3.bench import PeakMemory, rss_bytes
    from llama3.llama import build_model
    from llama3.weights import read_checkpoint
    out = {"rss_before_mb": rss_bytes() / 1e6, "anon_before_mb": anon_bytes() / 1e6}
    with PeakMemory() as mem:
        start = time.perf_counter()
        model = build_model(read_checkpoint(path))
        out["load_s"] = time.perf_counter() - start
    out.update(load_peak_rss_mb=mem.peak / 1e6, load_anon_mb=anon_bytes() / 1e6)
    out["dtype"] = str(model.norm.weight.dtype)
    tokens = torch.randint(0, model.args.vocab_size, (1, forward_tokens))
    with PeakMemory() as mem, torch.inference_mode():
        start = time.perf_counter()
        model(tokens, logits_index=torch.tensor([forward_tokens - 1]))
        out["forward_s"] = time.perf_counter() - start
    out.update(forward_peak_rss_mb=mem.peak / 1e6, forward_anon_mb=anon_bytes() / 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default /tmp/<preset>-random)")
    p.add_argument("--forward-tokens", type=int, default=4)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by the next run)")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the fresh measuring process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.forward_tokens)))
        return
    path = args.dir or Path("/tmp") / f"{args.preset}-random"
    margs = ModelArgs.preset(args.preset)
    if not (path / "model.safetensors.index.json").exists():
        start = time.perf_counter()
        size = write_random_checkpoint(path, margs)
        print(f"wrote {size / 1e9:.2f} GB to {path} in {time.perf_counter() - start:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    try:
        result = subprocess.run([sys.executable, __file__, "--measure", str(path), "--forward-tokens",
                                 str(args.forward_tokens)], capture_output=True, text=True, check=True)
    finally:
        if not args.keep:
            shutil.rmtree(path)
    r = json.loads(result.stdout.strip().splitlines()[-1])
    gb = size / 1e9
    print(f"{args.preset}: {gb:.2f} GB of {r['dtype'].removeprefix('torch.')} weights")
    print(f"  load     {r['load_s']:6.1f} s   peak RSS {r['load_peak_rss_mb'] / 1e3:6.2f} GB   anonymous "
          f"{r['load_anon_mb'] / 1e3:6.2f} GB  (before: {r['rss_before_mb'] / 1e3:.2f} GB RSS)")
    print(f"  forward  {r['forward_s']:6.1f} s   peak RSS {r['forward_peak_rss_mb'] / 1e3:6.2f} GB   anonymous "
          f"{r['forward_anon_mb'] / 1e3:6.2f} GB  ({args.forward_tokens} tokens; RSS now includes the mapped weights)")
    margin = r["forward_peak_rss_mb"] / 1e3 - gb
    print(f"  peak over the weights' size: {margin:+.2f} GB")


if __name__ == "__main__":
    main()
