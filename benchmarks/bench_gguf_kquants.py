"""What GGUF's 5- and 6-bit K-quants (Q5_K, Q6_K) cost in each representation a quantized model can hold them in.

    python benchmarks/bench_gguf_kquants.py                  # Llama 3.2 1B layer shapes, one thread
    python benchmarks/bench_gguf_kquants.py --dim 4096 --hidden 14336   # Llama 3 8B

One Llama layer of random Gaussian weights is written as F32 GGUF (the gguf package's writer) and quantized by
llama.cpp's own quantizer (llama-cpp-python) to Q6_K and Q5_K_S. Each Q6_K / Q5_K matrix, dequantized exactly
(gguf.quants), is then held as fp32, bf16, int8 per output channel (torch's `_weight_int8pack_mm`) or int4 in
groups of 32 (torch's `_weight_int4pack_mm_for_cpu`), and for each we print the bytes per weight, the error
against the exact dequantized weights (relative RMS of the weights and of the layer outputs for random inputs,
next to the error the file's own quantization made against the original weights) and the median time of a
one-token matmul (decode) and a 128-token one (prefill).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' GGUF writer and quantizer

import torch  # noqa: E402

from llama3.args import ModelArgs  # noqa: E402
from llama3.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8  # noqa: E402
from llama3.weights.gguf import GGUFFile, read_tensor  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def representations(w: torch.Tensor):
    """name -> (bytes per weight, weights as held (fp32), function x -> x @ w.T in that representation)."""
    q8, s8 = quantize_int8(w)
    int8 = Int8Linear(q8, s8)
    q4, s4, z4 = quantize_int4(w, 32)
    int4 = Int4Linear(q4, s4, z4, 32)
    from llama3.quantize import dequantize_int4
    bf16 = w.bfloat16()
    return {
        "fp32": (4.0, w, lambda x: torch.nn.functional.linear(x, w)),
        "bf16": (2.0, bf16.float(), lambda x: torch.nn.functional.linear(x.bfloat16(), bf16)),
        "int8/channel": (1.0 + 2 / w.shape[1], q8.float() * s8.float()[:, None], lambda x: int8(x.bfloat16())),
        "int4/g32": (0.5 + 4 / 32, dequantize_int4(q4, s4.float(), z4.float()), lambda x: int4(x.bfloat16())),
    }


def main() -> None:
    from conftest import llama_cpp_quantize, random_model, write_gguf
    from gguf import GGMLQuantizationType
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, threads: {a.threads}")
    args = ModelArgs(dim=a.dim, n_layers=1, n_heads=a.dim // 64, n_kv_heads=8, vocab_size=256, hidden_dim=a.hidden)
    original = {k: v for k, v in random_model(args).state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(Path(tmp) / "f32.gguf", args, original, GGMLQuantizationType.F32)
        files = {t: llama_cpp_quantize(f32, Path(tmp) / f"{t}.gguf", t) for t in ("Q6_K", "Q5_K_S")}
        rows = []
        for file_type, path in files.items():
            for t in GGUFFile(path).tensors.values():
                if t.kind not in ("Q6_K", "Q5_K") or not t.name.endswith(("ffn_down.weight", "attn_q.weight")):
                    continue
                exact = read_tensor(t)
                truth = original[{"ffn_down": "layers.0.feed_forward.w2", "attn_q": "layers.0.attention.wq"}[
                    t.name.split(".")[2]] + ".weight"].float()
                file_error = ((exact - truth).norm() / truth.norm()).item()
                x1, x128 = torch.randn(1, exact.shape[1]), torch.randn(128, exact.shape[1])
                y = x128 @ exact.T
                for name, (bpw, held, fn) in representations(exact).items():
                    w_err = ((held - exact).norm() / exact.norm()).item()
                    y_err = ((fn(x128).float() - y).norm() / y.norm()).item()
                    rows.append((t.kind, t.name.split(".")[2], tuple(exact.shape), name, bpw, file_error, w_err,
                                 y_err, median_time(lambda: fn(x1), a.repeats) * 1e6,
                                 median_time(lambda: fn(x128), max(3, a.repeats // 4)) * 1e3))
    print(f"{'type':5} {'matrix':9} {'shape':13} {'held as':13} {'B/w':>5} {'file err':>9} {'w err':>9} "
          f"{'y err':>9} {'decode us':>10} {'prefill ms':>10}")
    for r in rows:
        print(f"{r[0]:5} {r[1]:9} {str(r[2]):13} {r[3]:13} {r[4]:5.2f} {r[5]:9.2e} {r[6]:9.2e} {r[7]:9.2e} "
              f"{r[8]:10.0f} {r[9]:10.2f}")


if __name__ == "__main__":
    main()
