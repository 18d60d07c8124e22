"""Fast CPU matmuls, applied to a model from outside:
  - inference: every nn.Linear swapped for a PackedLinear whose weight is reordered once into oneDNN's blocked
    layout (`prepack`);
  - training: every nn.Linear's forward and backward matmuls sent to oneDNN, parameters untouched
    (`use_onednn_linears`);
  - quantized decoding on AVX2-only CPUs: int4 / int8 weights times int8-quantized activations (`avx2_kernels`,
    used by llama3/quantize.py).

Why: torch's F.linear hands fp32 matmuls to MKL, which on the AMD EPYC machines we measured runs at about half the
fp32 roof (~200 of ~450 GFLOP/s at a training step's shapes, a third of the roof at a 512-token prompt's), and
costs 7x more for 2 to 16 rows than for one (it repacks the weight on every call). oneDNN runs the same shapes at
~450 GFLOP/s with a plain weight, faster still prepacked, and takes about as long for 5 rows as for 1, which is
what makes checking k drafted tokens in one pass cheap (speculative decoding). See docs/PERFORMANCE.md.

Prepacked weights are opaque oneDNN tensors (no autograd, no state_dict export); with tied embeddings the output
projection gets its own packed copy (the embedding keeps its rows for the lookup).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .model import Transformer

_ROWS_HINT = 512  # oneDNN picks the blocked layout for this many rows; measured as fast for 1 row as any hint


# A custom op, so that torch.compile calls it as it is (inductor cannot lower the oneDNN call with a packed weight as
# a graph input) and so that training can give it a backward (below). The weight is plain or prepacked.
@torch.library.custom_op("llama3::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N), through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def can_prepack(model: Transformer) -> bool:
    """fp32 models on a CPU whose torch build has oneDNN."""
    w = model.norm.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    def __init__(self, weight: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        self.register_buffer("weight", packed, persistent=False)  # not in state_dict: an opaque layout

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def prepack(model: Transformer) -> Transformer:
    """Swap the model's nn.Linear modules for PackedLinear, one at a time (each original weight is freed as soon as
    its packed copy exists, unless something else still holds it). Returns the model."""
    if not can_prepack(model):
        raise ValueError("prepacking needs an fp32 model on the CPU and a torch build with oneDNN")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            model.set_submodule(name, PackedLinear(module.weight))
    return model


# ---- training: oneDNN matmuls with autograd, parameters unchanged ----------------------------------------------

def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    # Both gradients are matmuls of the same kind, so they go through oneDNN too; the transposed copies cost a
    # pass over memory each, small next to the matmul they make twice as fast.
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = onednn_linear(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
    grad_w = onednn_linear(grad.t().contiguous(), x.t().contiguous()) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_save_inputs)


class OneDNNLinear(nn.Linear):
    """An nn.Linear (same parameter, same state dict) whose matmuls run in oneDNN, forward and backward."""

    def forward(self, x: Tensor) -> Tensor:
        out = onednn_linear(x.reshape(-1, self.in_features).contiguous(), self.weight)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def can_use_onednn_linears(model: nn.Module) -> bool:
    """fp32 parameters on a CPU whose torch build has oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Turn the model's plain nn.Linear modules into OneDNNLinear in place (their parameters, names and hooks stay
    as they are). Not for tensor-parallel models: oneDNN's op has no DTensor sharding rule. Returns the model."""
    if not can_use_onednn_linears(model):
        raise ValueError("oneDNN linears need fp32 parameters on the CPU and a torch build with oneDNN")
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model



# ---- quantized decoding on AVX2-only CPUs -------------------------------------------------------------------------
#
# torch's int4 / int8 CPU kernels turn each weight into a float before multiplying; on AVX2 that conversion, not
# memory, bounds a decoding step (~6 G weights/s a core). These kernels quantize the few activation rows to int8 per
# block of 32 (as llama.cpp does) and multiply bytes with AVX2's 8-bit multiply-add (32 products an instruction),
# so a step reads the weights at closer to memory speed. The int4 layout is ours: per 32 weights 16 bytes, low
# nibbles weights 0..15 and high nibbles 16..31 (GGUF's Q4 order), bf16 scale and zero per group with torch's
# convention w = (q - 8) * scale + zero. Rounding activations to int8 (a step of 1/127 of each block's largest value)
# costs more precision than bf16's 8-bit mantissa: on the tests' random tiny model logits move ~4% of their range
# from exact math (the file's own weights quantization: ~22%); the zero term uses the exact fp32 sums of x. Compiled
# once per machine with the system C compiler into $LLAMA3_HOME/kernels; without one, or on other CPUs, torch's
# kernels are used as before.

_AVX2_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline float bf16(uint16_t v) { union { uint32_t u; float f; } c; c.u = (uint32_t)v << 16; return c.f; }
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* x -> int8 per block of 32 (d = max|x| / 127), each block's d and the exact fp32 sum of its values. */
static void quantize_blocks(const float* x, int64_t n_blocks, int8_t* xq, float* d, float* sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < n_blocks; b++) {
        const float* p = x + 32 * b;
        __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 8) {
            __m256 v = _mm256_loadu_ps(p + i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
            sum = _mm256_add_ps(sum, v);
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float db = _mm_cvtss_f32(m) / 127.0f;
        d[b] = db;
        sums[b] = hsum(sum);
        const __m256 inv = _mm256_set1_ps(db > 0 ? 1.0f / db : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + 8 * i), inv),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i r = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        r = _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(xq + 32 * b), r);
    }
}

/* out (M, N) = x (M, K) @ W.T, W 4-bit in our layout: sum w x = scale * d * sum q xq + (zero - 8 scale) * sum x.
   Up to 4 rows of x share each unpacked group of weights. */
int q4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
              const uint16_t* zeros, int64_t N, float* out, int threads) {
    const int64_t G = K / 32;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(M * G * sizeof(float));
    float* xs = malloc(M * G * sizeof(float));
    if (!xq || !xd || !xs) { free(xq); free(xd); free(xs); return 1; }
    quantize_blocks(x, M * G, xq, xd, xs);
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    if (M == 1 && G % 8 == 0) {  /* decoding one row: 8 groups' scales at a time, in vectors */
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t* wr = w + n * (K / 2);
            __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
            for (int64_t g0 = 0; g0 < G; g0 += 8) {
                __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(scales + n * G + g0))), 16));
                __m256 zv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(zeros + n * G + g0))), 16));
                macc = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), sv, zv), _mm256_loadu_ps(xs + g0), macc);
                __m256 sd = _mm256_mul_ps(sv, _mm256_loadu_ps(xd + g0));
                __m256 part = _mm256_setzero_ps();
                for (int j = 0; j < 8; j++) {
                    __m128i v = _mm_loadu_si128((const __m128i*)(wr + 16 * (g0 + j)));
                    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i*)(xq + 32 * (g0 + j)))), ones);
                    part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(sd, _mm256_set1_epi32(j)), part);
                }
                acc = _mm256_add_ps(acc, part);
            }
            out[n] = hsum(acc) + hsum(macc);
        }
        free(xq); free(xd); free(xs);
        return 0;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wr = w + n * (K / 2);
        const uint16_t* sr = scales + n * G;
        const uint16_t* zr = zeros + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            float macc[4] = {0, 0, 0, 0};
            for (int64_t g = 0; g < G; g++) {
                __m128i v = _mm_loadu_si128((const __m128i*)(wr + 16 * g));
                __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
                const float s = bf16(sr[g]), mn = bf16(zr[g]) - 8.0f * s;
                for (int i = 0; i < rows; i++) {
                    const int64_t m = m0 + i;
                    __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * K + 32 * g));
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * xd[m * G + g]), acc[i]);
                    macc[i] += mn * xs[m * G + g];
                }
            }
            for (int i = 0; i < rows; i++) out[(m0 + i) * N + n] = hsum(acc[i]) + macc[i];
        }
    }
    free(xq); free(xd); free(xs);
    return 0;
}

/* out (M, N) = x (M, K) @ W.T, W int8 (N, K) with one fp32 scale per row. */
int q8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* row_scales, int64_t N,
              float* out, int threads) {
    const int64_t G = K / 32;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(M * G * sizeof(float));
    float* xs = malloc(M * G * sizeof(float));
    if (!xq || !xd || !xs) { free(xq); free(xd); free(xs); return 1; }
    quantize_blocks(x, M * G, xq, xd, xs);
    const __m256i ones = _mm256_set1_epi16(1);
    if (M == 1 && G % 8 == 0) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const int8_t* wr = w + n * K;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t g0 = 0; g0 < G; g0 += 8) {
                __m256 dv = _mm256_loadu_ps(xd + g0), part = _mm256_setzero_ps();
                for (int j = 0; j < 8; j++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + 32 * (g0 + j)));
                    __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + 32 * (g0 + j)));
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
                    part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(dv, _mm256_set1_epi32(j)), part);
                }
                acc = _mm256_add_ps(acc, part);
            }
            out[n] = hsum(acc) * row_scales[n];
        }
        free(xq); free(xd); free(xs);
        return 0;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < G; g++) {
                __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + 32 * g));
                __m256i wa = _mm256_sign_epi8(wv, wv);  /* |w| unsigned, the sign moved onto x */
                for (int i = 0; i < rows; i++) {
                    const int64_t m = m0 + i;
                    __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * K + 32 * g));
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, wv)), ones);
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[m * G + g]), acc[i]);
                }
            }
            for (int i = 0; i < rows; i++) out[(m0 + i) * N + n] = hsum(acc[i]) * row_scales[n];
        }
    }
    free(xq); free(xd); free(xs);
    return 0;
}

/* fp32 rows start..end of a 4-bit W in our layout (for prompts: fp32 matmuls on dequantized tiles). */
void q4_dequantize(const uint8_t* w, const uint16_t* scales, const uint16_t* zeros, int64_t K, int64_t start,
                   int64_t end, float* out, int threads) {
    const int64_t G = K / 32;
    const __m128i low = _mm_set1_epi8(0x0F);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = start; n < end; n++) {
        float* o = out + (n - start) * K;
        for (int64_t g = 0; g < G; g++) {
            const float s = bf16(scales[n * G + g]);
            const __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(bf16(zeros[n * G + g]) - 8.0f * s);
            __m128i v = _mm_loadu_si128((const __m128i*)(w + n * (K / 2) + 16 * g));
            __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int i = 0; i < 4; i++)
                _mm256_storeu_ps(o + 32 * g + 8 * i,
                                 _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), sv, mv));
        }
    }
}
"""
_AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]  # OpenMP: torch's own runtime, loaded
log = logging.getLogger("llama3.fast")


@functools.cache
def avx2_kernels() -> ctypes.CDLL | None:
    """The int8-activation kernels, compiled for this machine on first use; None on CPUs other than AVX2-only ones
    (AVX-512 keeps torch's kernels, measured faster there) or without a working C compiler."""
    if torch.backends.cpu.get_cpu_capability() != "AVX2" or os.environ.get("LLAMA3_AVX2_KERNELS") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: quantized decoding uses torch's int4/int8 kernels")
        return None
    from .hub import home
    digest = hashlib.sha256((_AVX2_SOURCE + " ".join(_AVX2_FLAGS)).encode()).hexdigest()[:16]
    path = home() / "kernels" / f"avx2-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, lib = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(_AVX2_SOURCE)
            done = subprocess.run([compiler, *_AVX2_FLAGS, str(src), "-o", str(lib)], capture_output=True, text=True)
            if done.returncode:
                log.warning("could not compile the AVX2 kernels (%s); using torch's", done.stderr.strip()[-300:])
                return None
            os.replace(lib, path)
    lib = ctypes.CDLL(str(path))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q4_linear.argtypes = [p, i64, i64, p, p, p, i64, p, c_int]
    lib.q8_linear.argtypes = [p, i64, i64, p, p, i64, p, c_int]
    lib.q4_dequantize.argtypes = [p, p, p, i64, i64, i64, p, c_int]
    return lib


def _call(status: int) -> None:
    if status:
        raise MemoryError("AVX2 kernel: out of memory for the quantized activations")


@torch.library.custom_op("llama3::int4_linear_avx2", mutates_args=())
def int4_linear_avx2(x: Tensor, weight: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """x (M, K) fp32 @ W.T, W 4-bit (N, K/2) in our layout with bf16 scales and zeros (N, K/32) -> (M, N) fp32."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0])
    _call(avx2_kernels().q4_linear(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), scales.data_ptr(),
                                   zeros.data_ptr(), weight.shape[0], out.data_ptr(), torch.get_num_threads()))
    return out


@int4_linear_avx2.register_fake
def _(x, weight, scales, zeros):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("llama3::int8_linear_avx2", mutates_args=())
def int8_linear_avx2(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (M, K) fp32 @ W.T, W int8 (N, K) with fp32 scales (N,) -> (M, N) fp32."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0])
    _call(avx2_kernels().q8_linear(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), scales.data_ptr(),
                                   weight.shape[0], out.data_ptr(), torch.get_num_threads()))
    return out


@int8_linear_avx2.register_fake
def _(x, weight, scales):
    return x.new_empty(x.shape[0], weight.shape[0])


def int4_dequantize_avx2(weight: Tensor, scales: Tensor, zeros: Tensor, start: int, end: int, out: Tensor) -> Tensor:
    """fp32 rows start..end of a 4-bit W in our layout, written into `out` (end - start, K)."""
    avx2_kernels().q4_dequantize(weight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.shape[1], start, end,
                                 out.data_ptr(), torch.get_num_threads())
    return out
