"""Loading GGUF files made by llama.cpp's quantizer: time and peak memory against the weights' fp32 size.

    python benchmarks/bench_gguf_load.py                 # Llama 3 vocabulary, dim 2048, 4 layers (~0.5B weights)
    python benchmarks/bench_gguf_load.py --layers 16     # the Llama 3.2 1B shape

Writes a random-weight F16 GGUF with the gguf package (cached under --dir), quantizes it with llama.cpp's
quantizer (llama-cpp-python) to Q8_0, Q4_K_M and Q6_K, then loads each in a fresh process, alternating: ours
(`llama3.weights.read_checkpoint`, fp32 tensors) and the reference, the gguf package's own `GGUFReader` +
`gguf.quants.dequantize` of every tensor into torch. Peak memory is the process's peak RSS minus its RSS before
loading (torch and the libraries already imported; VmHWM - VmRSS), over the fp32 bytes of the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' GGUF writer and llama.cpp quantizer

CHILD = r"""
import json, sys, time
import numpy as np, torch
from gguf import GGUFReader
from gguf.quants import dequantize
from llama3.weights import read_checkpoint
def status_mb(key):  # VmRSS now, VmHWM its peak (per address space: not inherited from the parent like ru_maxrss)
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) / 1024
rss_mb = lambda: status_mb("VmRSS")
before = rss_mb()
start = time.perf_counter()
if sys.argv[2] == "ours":
    sd = read_checkpoint(sys.argv[1]).state_dict
else:
    sd = {t.name: torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), np.float32))
          for t in GGUFReader(sys.argv[1]).tensors}
seconds = time.perf_counter() - start
weights = sum(t.numel() * 4 for t in sd.values()) / 2**20
peak = status_mb("VmHWM")
print(json.dumps({"s": seconds, "peak_over_start_mb": peak - before, "fp32_mb": weights}))
"""


def main() -> None:
    import torch
    from conftest import llama_cpp_quantize, write_gguf
    from gguf import GGMLQuantizationType

    from llama3.args import ModelArgs
    from llama3.model import Transformer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dir", type=Path, default=Path("/tmp/llama3-bench-gguf"))
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    args = ModelArgs.preset("llama3.2-1b", n_layers=a.layers)
    folder = a.dir / f"1b-{a.layers}layers"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "F16.gguf"
    if not f16.exists():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
        torch.manual_seed(0)
        state = {k: torch.randn(s) * 0.02 if len(s) == 2 else torch.ones(s) for k, s in shapes.items()}
        write_gguf(f16, args, state, GGMLQuantizationType.F16)
        del state
    files = {"F16": f16}
    for t in ("Q8_0", "Q4_K_M", "Q6_K"):
        files[t] = folder / f"{t}.gguf"
        if not files[t].exists():
            llama_cpp_quantize(f16, files[t], t)
    results = {}
    for _ in range(a.rounds):
        for name, path in files.items():
            for reader in ("ours", "gguf"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), reader], capture_output=True,
                                     text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
                results.setdefault((name, reader), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'file':7} {'MB':>6} {'fp32 MB':>8} {'ours s':>7} {'gguf s':>7} {'ratio':>6} {'ours peak/fp32':>15} "
          f"{'gguf peak/fp32':>15}")
    for name, path in files.items():
        ours, ref = results[(name, "ours")], results[(name, "gguf")]
        t_ours, t_ref = min(r["s"] for r in ours), min(r["s"] for r in ref)
        fp32 = ours[0]["fp32_mb"]
        print(f"{name:7} {path.stat().st_size / 2**20:6.0f} {fp32:8.0f} {t_ours:7.2f} {t_ref:7.2f} "
              f"{t_ref / t_ours:5.2f}x {max(r['peak_over_start_mb'] for r in ours) / fp32:15.2f} "
              f"{max(r['peak_over_start_mb'] for r in ref) / fp32:15.2f}")


if __name__ == "__main__":
    main()
