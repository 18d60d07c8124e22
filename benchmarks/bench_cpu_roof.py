"""The multiply-add roof of one core, in fp32 FMAs and in AVX2's 8-bit multiply-adds, and what it allows a prompt.

    python benchmarks/bench_cpu_roof.py                  # this machine's roof, and the prefill it bounds
    python benchmarks/bench_cpu_roof.py --measured 61    # ... against a measured prefill (tok/s, Llama 3.2 1B)

A prompt's matmuls are compute-bound, so a prefill rate needs multiply-adds at some fraction of the core's peak.
Two loops of independent multiply-adds, compiled here with the system C compiler, give the peak of the two ways
a CPU without AVX-512 can multiply: fp32 `vfmadd` (8 products an instruction) and the int8 chain llama.cpp's
quantized dot products use (`vpmaddubsw` 32 products into int16 pairs, `vpmaddwd` into int32, `vpaddd`). Where
the two peaks are equal, quantized activations cannot make a prompt faster than fp32 matmuls can, only cheaper to
read. Times are the thread's CPU time, so other jobs on the machine do not move them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Ten independent accumulators per loop: more than latency x throughput of either chain on the CPUs we use, so
# the loop runs at the instructions' throughput. The xor makes each product depend on its accumulator so the
# compiler cannot hoist the multiply out of the loop.
_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
volatile float fx = 1.0000001f, fy = 0.9999999f; volatile char c1 = 3, c2 = -2;
#define TEN(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9)
int main(void) {
    const long n = 100000000;
    __m256 x = _mm256_set1_ps(fx), y = _mm256_set1_ps(fy), s = _mm256_setzero_ps();
#define FDECL(i) __m256 a##i = _mm256_set1_ps(i * 0.5f);
#define FSTEP(i) a##i = _mm256_fmadd_ps(a##i, x, y);
#define FSUM(i) s = _mm256_add_ps(s, a##i);
    TEN(FDECL)
    double t = now();
    for (long k = 0; k < n; k++) { TEN(FSTEP) }
    const double fp32 = n * 10 * 8.0 / (now() - t);
    TEN(FSUM)
    __m256i w = _mm256_set1_epi8(c1), xv = _mm256_set1_epi8(c2), ones = _mm256_set1_epi16(1), si = _mm256_setzero_si256();
#define IDECL(i) __m256i b##i = _mm256_set1_epi32(i);
#define ISTEP(i) b##i = _mm256_add_epi32(b##i, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_xor_si256(xv, b##i)), ones));
#define ISUM(i) si = _mm256_add_epi32(si, b##i);
    TEN(IDECL)
    t = now();
    for (long k = 0; k < n; k++) { TEN(ISTEP) }
    const double int8 = n * 10 * 32.0 / (now() - t);
    TEN(ISUM)
#define HDECL(i) __m256i h##i = _mm256_set1_epi16(i);
#define HSTEP(i) h##i = _mm256_add_epi16(h##i, _mm256_maddubs_epi16(w, _mm256_xor_si256(xv, h##i)));
#define HSUM(i) si = _mm256_add_epi16(si, h##i);
    TEN(HDECL)
    t = now();
    for (long k = 0; k < n; k++) { TEN(HSTEP) }
    const double int16 = n * 10 * 32.0 / (now() - t);
    TEN(HSUM)
    float v[8]; _mm256_storeu_ps(v, s);
    printf("%.3f %.3f %.3f %g %d\n", fp32 / 1e9, int8 / 1e9, int16 / 1e9, v[0], _mm256_extract_epi32(si, 0));
    return 0;
}
"""

# Multiply-adds per prompt token in the layers' matmuls (2 * dim * (dim + kv) + 3 * dim * ffn per layer).
MODELS = {"llama3.2-1b": 16 * (2 * 2048 * (2048 + 512) + 3 * 2048 * 8192),
          "llama3-8b": 32 * (2 * 4096 * (4096 + 1024) + 3 * 4096 * 14336)}


def measure_roof() -> tuple[float, float, float]:
    """Peaks of one core in G multiply-adds per second: fp32 FMA, the int8 chain into int32, and `vpmaddubsw`
    into int16 alone (what a kernel could reach if it never widened: a bound that no format with a scale per
    32 weights allows). Each int8 step also pays one xor (it keeps the products apart), as a kernel pays for
    unpacking nibbles."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        sys.exit("needs a C compiler")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "roof.c", Path(tmp) / "roof"
        src.write_text(_SOURCE)
        subprocess.run([cc, "-O3", "-mavx2", "-mfma", str(src), "-o", str(exe)], check=True)
        fp32, int8, int16, *_ = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return float(fp32), float(int8), float(int16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="cores the prefill bound assumes")
    p.add_argument("--model", default="llama3.2-1b", choices=sorted(MODELS))
    p.add_argument("--measured", type=float, nargs="*", default=[], help="prefill tok/s to place against the roof")
    args = p.parse_args()
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()}")
    fp32, int8, int16 = measure_roof()
    print(f"one core, G multiply-adds/s: fp32 FMA {fp32:.1f}; int8 maddubs+madd+add {int8:.1f} "
          f"({int8 / fp32:.2f}x fp32); maddubs into int16 alone {int16:.1f} ({int16 / fp32:.2f}x)")
    macs = MODELS[args.model]
    best = max(fp32, int8) * args.threads * 1e9 / macs
    print(f"{args.model}: {macs / 1e9:.2f} G multiply-adds a prompt token -> at most {best:.0f} tok/s on "
          f"{args.threads} cores at 100% of the faster peak")
    for rate in args.measured:
        print(f"  measured {rate:.0f} tok/s = {rate / best:.0%} of that peak")


if __name__ == "__main__":
    main()
