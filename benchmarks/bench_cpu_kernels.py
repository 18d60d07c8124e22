"""CPU matmul kernels for quantized weights, side by side at real model shapes: which one to use on this CPU.

    python benchmarks/bench_cpu_kernels.py                       # 1 thread, decode (1 row) and prefill (512 rows)
    python benchmarks/bench_cpu_kernels.py --threads 2 --models llama3.2-1b

For each weight shape of a model (the default model, Llama 3.2 1B, Llama 3 8B) it times y = x @ W.T for x of M
rows with every candidate kernel and prints microseconds and the ratio to fp32 (MKL). Weights are cycled through
enough copies to exceed the L3 cache, so decode numbers are DRAM-bound as they are in a real decode step. The
candidates are the ones llama3/quantize.py can choose from (KERNELS there) plus plain references.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llama3 import quantize as q  # noqa: E402
from llama3.fast import onednn_linear  # noqa: E402

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
    """name -> (function, args): every way we can compute x @ w.T for this weight."""
    n, k = w.shape
    w8, s8 = q.quantize_int8(w)
    packed, scales, zeros = q.quantize_int4(w, 32)
    i4 = q.Int4Linear(packed, scales, zeros, 32)
    x32 = torch.randn(m, k)
    xbf = x32.bfloat16()
    out = {
        "fp32 mkl": (torch.nn.functional.linear, (x32, w)),
        "fp32 onednn prepacked": (onednn_linear, (x32, torch.ops.mkldnn._reorder_linear_weight(w, 512))),
        "int8 _weight_int8pack_mm bf16": (torch.ops.aten._weight_int8pack_mm, (xbf, w8, s8)),
        "int8 _weight_int8pack_mm fp32": (torch.ops.aten._weight_int8pack_mm, (x32, w8, s8.float())),
        "int4 _weight_int4pack_mm bf16": (torch.ops.aten._weight_int4pack_mm_for_cpu,
                                          (xbf, i4.weight, 32, i4.scales_and_zeros)),
    }
    for name, kernel in q.KERNELS.items():
        if kernel.rows_ok(m):
            weights = kernel.prepare(w8, s8) if kernel.bits == 8 else kernel.prepare(packed, scales, zeros)
            out[name] = (kernel.run, (x32, *weights))
    return out


def time_call(fn, copies: list[tuple], repeats: int) -> float:
    """Median seconds of one call, cycling through the weight copies."""
    fn(*copies[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for args in copies:
            fn(*args)
        times.append((time.perf_counter() - start) / len(copies))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,llama3.2-1b,llama3-8b")
    p.add_argument("--rows", default="1,512", help="activation rows M: 1 = decode, 512 = a prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, torch {torch.__version__}")
    torch.manual_seed(0)
    for model in args.models.split(","):
        for m in map(int, args.rows.split(",")):
            print(f"\n{model}, M = {m}: microseconds per call (ratio to fp32 mkl)")
            for label, (n, k) in shapes(model).items():
                w = torch.randn(n, k) / k ** 0.5
                base = candidates(w, m)
                # a few copies for the bandwidth-bound decode; prefill is compute-bound, one copy is enough
                n_copies = max(1, min(8, CACHE_BYTES // (n * k))) if m == 1 else 1
                copies = {name: [args_] + [candidates(w, m)[name][1] for _ in range(n_copies - 1)]
                          for name, (_, args_) in base.items()} if n_copies > 1 else \
                    {name: [args_] for name, (_, args_) in base.items()}
                ref = None
                cells = []
                for name, (fn, _) in base.items():
                    t = time_call(fn, copies[name], args.repeats if m == 1 else max(2, args.repeats // 2))
                    ref = ref or t
                    cells.append(f"{name} {t * 1e6:.0f} ({ref / t:.2f}x)")
                print(f"  {label} {n}x{k}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
