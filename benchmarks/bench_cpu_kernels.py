"""CPU matmul kernels for quantized weights, side by side at real model shapes: which one to use on this CPU.

    python benchmarks/bench_cpu_kernels.py                       # 1 thread, decode (1 row) and prefill (512 rows)
    python benchmarks/bench_cpu_kernels.py --threads 2 --models llama3.2-1b

For each weight shape of a model (the default model, Llama 3.2 1B, Llama 3 8B) it times y = x @ W.T for x of M
rows with every candidate kernel and prints microseconds and the ratio to fp32 (MKL). Weights are cycled through
enough copies to exceed the L3 cache, so decode numbers are DRAM-bound as they are in a real decode step. The
candidates are torch's kernels, our AVX2 int8-activation kernels (llama3/fast.py; AVX2-only CPUs: our int4 / int8
layouts, and GGUF Q4_K / Q6_K super-blocks as a file stores them) and our modules (llama3/quantize.py), which pick
among them by instruction set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # random GGUF blocks (conftest.py)

import torch  # noqa: E402

from llama3 import quantize as q  # noqa: E402
from llama3.fast import avx2_kernels, int4_linear_avx2, int8_linear_avx2, onednn_linear  # noqa: E402

from conftest import random_kquant_blocks  # noqa: E402

# (name, dim, ffn hidden, kv dim, vocab): the projections whose shapes differ.
MODELS = {
    "smollm2-135m": (576, 1536, 192, 49152),
    "llama3.2-1b": (2048, 8192, 512, 128256),
    "llama3-8b": (4096, 14336, 1024, 128256),
}
CACHE_BYTES = 96 << 20  # more than L3 (32 MB on the machines we use), so every call reads its weight from DRAM


def shapes(model: str) -> dict[str, tuple[int, int]]:
    dim, ffn, kv, _ = MODELS[model]
    return {"wq/wo": (dim, dim), "wk/wv": (kv, dim), "w1/w3": (ffn, dim), "w2": (dim, ffn)}


def candidates(w: torch.Tensor, m: int) -> dict[str, tuple]:
    """name -> (function, args): ways to compute x @ w.T for this weight, x fp32 (M, in). The `llama3 int8/int4`
    rows are our modules with fp32 activations: what an AVX2 machine runs (the kernel in bf16 for few rows,
    fp32 matmuls on dequantized tiles for many); on AVX-512 our models run the bf16 kernels rows directly."""
    w8, s8 = q.quantize_int8(w)
    packed, scales, zeros = q.quantize_int4(w, 32)
    int8, int4 = q.Int8Linear(w8, s8.float()), q.Int4Linear(packed, scales, zeros, 32)
    x32 = torch.randn(m, w.shape[1])
    xbf = x32.bfloat16()
    ours = {}
    if avx2_kernels():  # our int8-activation kernels (AVX2-only CPUs), called directly
        # GGUF super-blocks as stored (random codes: the time does not depend on them), through our modules
        kquant = {kind: q.KQuantLinear(random_kquant_blocks(kind, *w.shape), kind, w.shape[1])
                  for kind in ("Q4_K", "Q6_K")}
        ours = {"avx2 int8 x int8": (int8_linear_avx2, (x32, w8, s8.float())),
                "avx2 int4 x int8": (int4_linear_avx2, (x32, q.pack_groups_for_avx2(packed), scales, zeros)),
                **{f"llama3 {kind} blocks": (layer, (x32,)) for kind, layer in kquant.items()}}
    if int4.kernel != "torch":  # torch's int4 kernel wants its own layout
        torch_int4 = q.Int4Linear.__new__(q.Int4Linear)
        torch.nn.Module.__init__(torch_int4)
        torch_int4.weight = q.pack_for_cpu_kernel(q.unpack_nibbles(packed))
        torch_int4.scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(q.SCALE_DTYPE).contiguous()
    else:
        torch_int4 = int4
    return {
        "fp32 mkl": (torch.nn.functional.linear, (x32, w)),
        "fp32 onednn prepacked": (onednn_linear, (x32, torch.ops.mkldnn._reorder_linear_weight(w, 512))),
        "int8 kernel bf16": (torch.ops.aten._weight_int8pack_mm, (xbf, w8, s8)),
        "int8 kernel fp32": (torch.ops.aten._weight_int8pack_mm, (x32, w8, s8.float())),
        "int4 kernel bf16": (torch.ops.aten._weight_int4pack_mm_for_cpu,
                             (xbf, torch_int4.weight, 32, torch_int4.scales_and_zeros)),
        **ours,
        "llama3 int8": (int8, (x32,)),
        "llama3 int4": (int4, (x32,)),
    }


def time_call(fn, copies: list[tuple], repeats: int, clock) -> float:
    """Median seconds of one call, cycling through the weight copies."""
    fn(*copies[0])
    times = []
    for _ in range(repeats):
        start = clock()
        for args in copies:
            fn(*args)
        times.append((clock() - start) / len(copies))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,llama3.2-1b,llama3-8b")
    p.add_argument("--rows", default="1,4,512", help="activation rows M: 1 = decode, 4 = a batch, 512 = a prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # One thread computes on this one: its CPU time leaves out the time other processes held the core (the machines
    # we share are loaded), which wall time cannot. More threads: wall time.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"{'thread CPU' if args.threads == 1 else 'wall'} time; load average {os.getloadavg()}")
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, torch {torch.__version__}")
    torch.manual_seed(0)
    for model in args.models.split(","):
        for m in map(int, args.rows.split(",")):
            print(f"\n{model}, M = {m}: microseconds per call (speed-up over fp32 mkl)")
            for label, (n, k) in shapes(model).items():
                # decode reads its weights from DRAM: enough copies to exceed the cache (prefill: one is enough)
                n_copies = max(1, min(8, CACHE_BYTES // (n * k))) if m <= q.DEQUANTIZE_ABOVE_ROWS else 1
                sets = [candidates(torch.randn(n, k) / k ** 0.5, m) for _ in range(n_copies)]
                cells, ref = [], None
                for name, (fn, _) in sets[0].items():
                    t = time_call(fn, [s[name][1] for s in sets], args.repeats, clock)
                    ref = ref or t
                    cells.append(f"{name} {t * 1e6:.0f} ({ref / t:.2f}x)")
                print(f"  {label} {n}x{k}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
