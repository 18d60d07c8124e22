"""Speed at real Llama 3 shapes: llama3 against llama.cpp on the same GGUF files, in one run, alternating.

    python benchmarks/bench_real_shapes.py                  # Llama 3.2 1B shape: Q8_0 and Q4_K_M files, 2 threads
    python benchmarks/bench_real_shapes.py --shapes llama3.2-1b,llama3-8b --types F16,Q8_0,Q4_K_M

The files: random weights at the real model's shape with Llama 3's real vocabulary (128256 tokens, Meta's
tokenizer.model converted by transformers' converter, llama-bpe pre-tokenizer). An F16 file is written tensor by
tensor with the gguf package (the 8B one is 16 GB and never in memory whole; it needs ~30 GB of disk with its
quantizations), then Q8_0 and Q4_K_M are made from it by llama.cpp's own quantizer (llama-cpp-python's
`llama_model_quantize`). They are cached under ~/.cache/llama3/bench.

Our engine first loads each file once in its own process with its conversion cache emptied ("first load": the
conversion, written to the cache); then each file is measured by benchmarks/bench_inference.py, whose load of our
engine is the second one (memory-mapped from the cache): our engine for that file (F16: fp32, Q8_0: int8, Q4_K_M:
int4) and llama.cpp on the file itself, each in its own process, same prompt ids, thread count and token counts,
alternating rounds. This script adds the fraction of the memory-bandwidth roof that decode reaches: the bytes of
weights a token reads (every matrix but the embedding table, which is only looked up; with tied embeddings that table
is the output matrix and is read) times tokens/s, against the bandwidth of a large copy (bytes read + written per
second, same threads) measured in the same run. It prints the CPU's instruction-set flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the GGUF-writing helpers the tests use (conftest.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llama3.args import ModelArgs  # noqa: E402

CACHE = Path.home() / ".cache" / "llama3" / "bench"
OURS = {"F16": "ours-fp32", "Q8_0": "ours-int8", "Q4_K_M": "ours-int4"}
QUANTIZE = {"F16": "", "Q8_0": "int8", "Q4_K_M": "int4"}
# A first load: the file converted and its conversion cached (llama3/weights/cache.py); the benchmark's own load
# of our engine, which follows, is then a second load, as every load after a model's first is.
FIRST_LOAD = r"""
import shutil, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[3]))
import llama3
from llama3.llama import _converted_cache
path, quantize = Path(sys.argv[1]), sys.argv[2] or None
shutil.rmtree(_converted_cache(path, None, "cpu", quantize, 32).dir, ignore_errors=True)
start = time.perf_counter()
llama3.load(path, quantize=quantize)
print(time.perf_counter() - start)
"""
FLAG_PREFIXES = ("avx", "fma", "f16c", "amx", "vnni", "bmi2")


def cpu_flags() -> str:
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return " ".join(sorted(f for f in flags if f.startswith(FLAG_PREFIXES)))


def copy_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a copy far larger than the caches (best of 5)."""
    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


# ---- the files -----------------------------------------------------------------------------------------------------

def write_random_f16(path: Path, args: ModelArgs) -> None:
    """A Llama GGUF in F16 (norms F32, as llama.cpp writes them) with random weights, written tensor by tensor."""
    from dataclasses import replace

    import gguf
    from conftest import gguf_name, hf_tokenizer_of_meta_llama3, llama3_gguf_tokenizer, llama_gguf_writer

    from llama3.model import meta_model, rope_frequencies
    tensors = {}  # GGUF name -> (shape, numpy dtype, a function making the values)
    if args.rope_scaling:  # llama.cpp stores Llama 3.1 / 3.2 scaled RoPE as a tensor of frequency divisors
        divisors = (rope_frequencies(replace(args, rope_scaling=None)) / rope_frequencies(args)).numpy()
        tensors["rope_freqs.weight"] = (divisors.shape, np.float32, lambda: divisors)
    for seed, (name, t) in enumerate(meta_model(args).state_dict().items()):
        shape = tuple(t.shape)
        if args.tie_embeddings and name == "output.weight":
            continue
        if len(shape) == 2:
            tensors[gguf_name(name)] = (shape, np.float16, lambda shape=shape, seed=seed: random_matrix(shape, seed))
        else:
            tensors[gguf_name(name)] = (shape, np.float32, lambda shape=shape: np.ones(shape, np.float32))
    part = path.with_suffix(".part")
    tokenizer = llama3_gguf_tokenizer(hf_tokenizer_of_meta_llama3())
    w = llama_gguf_writer(part, args, gguf.GGMLQuantizationType.F16, tokenizer)
    for name, (shape, dtype, _) in tensors.items():
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, make in tensors.values():
        w.write_tensor_data(make())
    w.close()
    part.rename(path)


def random_matrix(shape: tuple[int, int], seed: int) -> np.ndarray:
    """N(0, 0.02) in fp16, made a slice of rows at a time (no fp32 copy of a 1 GB embedding)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=torch.float16)
    for r in range(0, shape[0], 4096):
        out[r:r + 4096] = torch.randn(out[r:r + 4096].shape, generator=g) * 0.02
    return out.numpy()


def build_files(shape: str, types: list[str]) -> dict[str, Path]:
    from conftest import llama_cpp_quantize
    args = ModelArgs.preset(shape)
    folder = CACHE / shape
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "F16.gguf"
    missing = [t for t in types if not (folder / f"{t}.gguf").exists()]
    if missing and not f16.exists():  # the intermediate: it may be deleted once the quantized files exist (8B: 16 GB)
        print(f"writing {f16} ...", file=sys.stderr, flush=True)
        write_random_f16(f16, args)
    for t in missing:
        if t != "F16":
            print(f"quantizing {t} with llama.cpp ...", file=sys.stderr, flush=True)
            llama_cpp_quantize(f16, folder / f"{t}.part", t).rename(folder / f"{t}.gguf")
    return {t: folder / f"{t}.gguf" for t in types}


def bytes_per_token(path: Path) -> int:
    """Bytes of the matrices one decoding step reads from the file as llama.cpp holds it."""
    from llama3.weights.gguf import GGUFFile
    tensors = GGUFFile(path).tensors
    tied = "output.weight" not in tensors
    return sum(t.nbytes for name, t in tensors.items() if len(t.shape) == 2 and (tied or name != "token_embd.weight"))


def ours_bytes_per_token(weights_mb: float, args: ModelArgs, path: Path, engine: str) -> float:
    """Our model's bytes (as loaded) less the embedding rows we only look up, when the output is separate: the
    file's own blocks where int4 keeps them (Q4_K / Q6_K on AVX2), int8 rows otherwise."""
    if args.tie_embeddings:
        return weights_mb * 1e6
    from llama3.fast import KQUANT_TYPES, avx2_kernels
    from llama3.weights.gguf import GGUFFile
    embedding = GGUFFile(path).tensors["token_embd.weight"]
    kept = engine == "ours-int4" and embedding.kind in KQUANT_TYPES and avx2_kernels() is not None
    return weights_mb * 1e6 - (embedding.nbytes if kept else args.vocab_size * (args.dim + 2))


# ---- the run -------------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama3.2-1b", help="presets: llama3.2-1b, llama3-8b (8B: ~30 GB of disk)")
    p.add_argument("--types", default="Q8_0,Q4_K_M", help="from F16, Q8_0, Q4_K_M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="compile our decode step (torch.compile)")
    p.add_argument("--with-fp32", action="store_true", help="also our fp32 engine on each quantized file")
    args = p.parse_args()
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}; flags: {cpu_flags()}")
    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} cpus, {args.threads} threads per engine")
    bandwidth = copy_bandwidth(args.threads)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written)\n", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        model_args = ModelArgs.preset(shape)
        for kind, path in build_files(shape, args.types.split(",")).items():
            engines = [OURS[kind]] + ["ours-fp32"] * (args.with_fp32 and kind != "F16") + ["llamacpp"]
            out = CACHE / shape / f"{kind}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--model", str(path),
                   "--engines", ",".join(engines), "--threads", str(args.threads), "--rounds", str(args.rounds),
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                   "--json", str(out)] + ["--compile"] * args.compile
            first = subprocess.run([sys.executable, "-c", FIRST_LOAD, str(path), QUANTIZE[kind], str(args.threads)],
                                   check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            first_load_s = float(first.stdout.split()[-1])
            print(f"== {shape} {kind}: first load {first_load_s:.1f} s (converting, writing the cache)", flush=True)
            print(f"== {shape} {kind}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
            results = json.loads(out.read_text())["results"]
            file_bytes = bytes_per_token(path)
            for engine, r in results.items():
                read = (file_bytes if engine == "llamacpp" else
                        ours_bytes_per_token(r["weights_mb"], model_args, path, engine))
                r["first_load_s"] = first_load_s if engine == OURS[kind] else None
                rows.append((shape, kind, engine, r, read, read * r["decode_tok_s"] / bandwidth))
    print(f"\nload average at end {os.getloadavg()}; roof = bytes per token x decode tok/s / copy bandwidth "
          f"({bandwidth / 1e9:.1f} GB/s)\n")
    print("| shape | file | engine | first load s | load s | prefill tok/s | decode tok/s | peak MB | MB per token "
          "| roof |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, kind, engine, r, read, roof in rows:
        first = "" if r.get("first_load_s") is None else f"{r['first_load_s']:.1f}"
        print(f"| {shape} | {kind} | {engine} | {first} | {r['load_s']:.2f} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} | {r['peak_mb']:.0f} | {read / 1e6:.0f} | {roof:.0%} |")
    print()
    for shape, kind, engine, r, _, _ in rows:
        peer = next((x[3] for x in rows if x[:2] == (shape, kind) and x[2] == "llamacpp"), None)
        if engine != "llamacpp" and peer:
            print(f"{shape} {kind} {engine} / llama.cpp: decode {r['decode_tok_s'] / peer['decode_tok_s']:.2f}x, "
                  f"prefill {r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
