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
#include <string.h>

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

/* ---- GGUF K-quant super-blocks of 256 weights, multiplied as the file stores them ------------------------------
   x is quantized once per call to int8 per 256 values (d = max|x| / 127) with the sums of each 16 and each 32 of its
   codes; every product of a block is then an integer until one float multiply by d_w * d_x per 256 weights.
   Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of eight 6-bit (sc, m), 4 chunks of 32 bytes whose low nibbles are
   weights 64c..64c+31 and high nibbles the next 32; w = d sc q - dmin m.
   Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16), fp16 d;
   w = d s (q - 32), q in 0..63. */
typedef struct { int8_t q[256]; int16_t sum16[16]; int16_t sum32[8]; float d; } xblock;

static inline float fp16(const uint8_t* p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }

static void quantize_x256(const float* x, int64_t n_blocks, xblock* out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < n_blocks; b++) {
        const float* p = x + 256 * b;
        xblock* o = out + b;
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 256; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + i)));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float d = _mm_cvtss_f32(m) / 127.0f;
        o->d = d;
        const __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
        for (int g = 0; g < 8; g++) {
            __m256i q[4];
            for (int i = 0; i < 4; i++)
                q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + 32 * g + 8 * i), inv),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            __m256i r = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i*)(o->q + 32 * g),
                                _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        }
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += o->q[16 * k + i];
            o->sum16[k] = (int16_t)s;
        }
        for (int k = 0; k < 8; k++) o->sum32[k] = o->sum16[2 * k] + o->sum16[2 * k + 1];
    }
}

/* Q4_K's 12 bytes of 6-bit pairs -> sc[0..7] in bytes 0..7, m[0..7] in bytes 8..15. Sub-blocks 0..3 keep their
   six bits in the low bits of bytes 0..3 (sc) and 4..7 (m); sub-blocks 4..7 keep four bits in bytes 8..11 (sc low
   nibbles, m high nibbles) and their top two in the spare top bits of bytes 0..7. */
static inline __m128i q4k_scales(const uint8_t* s) {
    uint32_t u[3];
    memcpy(u, s, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    /* built in registers: four 32-bit stores read back as one 128-bit load would stall store forwarding */
    return _mm_setr_epi32((int)(u[0] & six), (int)((u[2] & four) | (((u[0] >> 6) & two) << 4)),
                          (int)(u[1] & six), (int)(((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4)));
}

/* sum over `nb` blocks of one Q4_K row times `rows` quantized x rows (x rows `xstride` blocks apart). */
static inline __attribute__((always_inline)) void q4k_dot(const uint8_t* w, const xblock* x, int64_t nb,
                                                          int64_t xstride, int rows, float* out, int64_t ostride) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m128 macc[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = w + 144 * b;
        const float d = fp16(blk), dmin = fp16(blk + 2);
        const __m128i sm = q4k_scales(blk + 4);
        const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));  /* sc[0..7] as int16, both lanes */
        const __m128i mins = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
        __m256i isum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 16 + 32 * c));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const __m256i s_lo = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c))));
            const __m256i s_hi = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c + 1))));
            for (int i = 0; i < rows; i++) {
                const int8_t* xq = x[i * xstride + b].q + 64 * c;
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xq)), s_lo);
                __m256i r = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + 32))), s_hi);
                isum[i] = _mm256_add_epi32(isum[i], _mm256_add_epi32(p, r));
            }
        }
        for (int i = 0; i < rows; i++) {
            const xblock* xb = x + i * xstride + b;
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_set1_ps(d * xb->d), acc[i]);
            __m128i pm = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i*)xb->sum32));
            macc[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(pm), _mm_set1_ps(dmin * xb->d), macc[i]);
        }
    }
    for (int i = 0; i < rows; i++) {
        __m128 m = _mm_add_ps(macc[i], _mm_movehl_ps(macc[i], macc[i]));
        out[i * ostride] = hsum(acc[i]) - _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
    }
}

/* Q6_K codes (0..63) of half h of a block: q[k] holds weights 128h + 32k .. 128h + 32k + 31. */
static inline void q6k_codes(const uint8_t* blk, int h, __m256i q[4]) {
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    const __m256i v0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
    const __m256i v1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
    const __m256i vh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
    const __m256i lows[4] = {_mm256_and_si256(v0, low), _mm256_and_si256(v1, low),
                             _mm256_and_si256(_mm256_srli_epi16(v0, 4), low), _mm256_and_si256(_mm256_srli_epi16(v1, 4), low)};
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_or_si256(lows[k], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(vh, 2 * k), two), 4));
}

static inline __attribute__((always_inline)) void q6k_dot(const uint8_t* w, const xblock* x, int64_t nb,
                                                          int64_t xstride, int rows, float* out, int64_t ostride) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = w + 210 * b;
        const float d = fp16(blk + 208);
        const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));  /* 16 x int16 */
        __m256i isum[4];
        for (int i = 0; i < rows; i++)  /* the -32 of every q: 32 * sum of s_k times x's sums of 16 */
            isum[i] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(
                _mm256_madd_epi16(sc, _mm256_loadu_si256((const __m256i*)x[i * xstride + b].sum16)), 5));
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6k_codes(blk, h, q);
            /* scales of half h, both lanes; group k takes s[8h + 2k] in its low 16 weights, s[8h + 2k + 1] above */
            const __m256i sh = _mm256_permute2x128_si256(sc, sc, h ? 0x11 : 0x00);
            for (int k = 0; k < 4; k++) {
                const __m256i sk = _mm256_shuffle_epi8(sh, _mm256_setr_epi8(
                    4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,
                    4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,
                    4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3,
                    4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3));
                for (int i = 0; i < rows; i++) {
                    const int8_t* xq = x[i * xstride + b].q + 128 * h + 32 * k;
                    __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i*)xq));
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(p, sk));
                }
            }
        }
        for (int i = 0; i < rows; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_set1_ps(d * x[i * xstride + b].d), acc[i]);
    }
    for (int i = 0; i < rows; i++) out[i * ostride] = hsum(acc[i]);
}

#define Q4_K 12
#define Q6_K 14
static int64_t block_bytes(int kind) { return kind == Q4_K ? 144 : kind == Q6_K ? 210 : 0; }

/* out (M, N) = x (M, K) @ W.T, W (N, K/256 blocks) in the GGUF type `kind` (ggml's type id). */
int kq_linear(int kind, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* out, int threads) {
    const int64_t nb = K / 256, row = nb * block_bytes(kind);
    xblock* xq = malloc(M * nb * sizeof(xblock));
    if (!xq) return 1;
    quantize_x256(x, M * nb, xq);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            const xblock* xr = xq + m0 * nb;
            float* o = out + m0 * N + n;
            /* constant row counts, so each call is compiled with its loops over rows unrolled */
            if (kind == Q4_K) {
                switch (rows) {
                    case 1: q4k_dot(w + n * row, xr, nb, nb, 1, o, N); break;
                    case 2: q4k_dot(w + n * row, xr, nb, nb, 2, o, N); break;
                    case 3: q4k_dot(w + n * row, xr, nb, nb, 3, o, N); break;
                    default: q4k_dot(w + n * row, xr, nb, nb, 4, o, N);
                }
            } else {
                switch (rows) {
                    case 1: q6k_dot(w + n * row, xr, nb, nb, 1, o, N); break;
                    case 2: q6k_dot(w + n * row, xr, nb, nb, 2, o, N); break;
                    case 3: q6k_dot(w + n * row, xr, nb, nb, 3, o, N); break;
                    default: q6k_dot(w + n * row, xr, nb, nb, 4, o, N);
                }
            }
        }
    }
    free(xq);
    return 0;
}

/* fp32 rows `rows[0..n)` of W (kind as above), each K weights, into out (n, K): the gguf package's arithmetic
   (w = (d sc) q - (dmin m) and w = (d s) (q - 32), products rounded to fp32 one at a time). */
void kq_dequantize(int kind, const uint8_t* w, int64_t K, const int64_t* rows, int64_t n, float* out, int threads) {
    const int64_t nb = K / 256, row = nb * block_bytes(kind);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t* wr = w + rows[r] * row;
        float* o = out + r * K;
        for (int64_t b = 0; b < nb; b++, o += 256) {
            const uint8_t* blk = wr + b * block_bytes(kind);
            if (kind == Q4_K) {
                const float d = fp16(blk), dmin = fp16(blk + 2);
                uint8_t s[16];
                _mm_storeu_si128((__m128i*)s, q4k_scales(blk + 4));
                for (int c = 0; c < 4; c++)
                    for (int half = 0; half < 2; half++) {
                        const __m256 sv = _mm256_set1_ps(d * s[2 * c + half]), mv = _mm256_set1_ps(dmin * s[8 + 2 * c + half]);
                        const __m128i v = _mm_srli_epi16(_mm_loadu_si128((const __m128i*)(blk + 16 + 32 * c)), 4 * half);
                        const __m128i v2 = _mm_srli_epi16(_mm_loadu_si128((const __m128i*)(blk + 32 + 32 * c)), 4 * half);
                        const __m128i lowq[2] = {_mm_and_si128(v, _mm_set1_epi8(0x0F)), _mm_and_si128(v2, _mm_set1_epi8(0x0F))};
                        for (int i = 0; i < 4; i++) {
                            __m128i part = i & 1 ? _mm_srli_si128(lowq[i >> 1], 8) : lowq[i >> 1];
                            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                            _mm256_storeu_ps(o + 64 * c + 32 * half + 8 * i, _mm256_sub_ps(_mm256_mul_ps(sv, q), mv));
                        }
                    }
            } else {
                const float d = fp16(blk + 208);
                const int8_t* sc = (const int8_t*)(blk + 192);
                for (int h = 0; h < 2; h++) {
                    __m256i q[4];
                    uint8_t codes[32];
                    q6k_codes(blk, h, q);
                    for (int k = 0; k < 4; k++) {
                        _mm256_storeu_si256((__m256i*)codes, q[k]);
                        for (int i = 0; i < 4; i++) {
                            __m256i c = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + 8 * i))),
                                                         _mm256_set1_epi32(32));
                            _mm256_storeu_ps(o + 128 * h + 32 * k + 8 * i, _mm256_mul_ps(
                                _mm256_set1_ps(d * sc[8 * h + 2 * k + i / 2]), _mm256_cvtepi32_ps(c)));
                        }
                    }
                }
            }
        }
    }
}
"""
_AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]  # OpenMP: torch's own runtime, loaded
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
    lib.kq_linear.argtypes = [c_int, p, i64, i64, p, i64, p, c_int]
    lib.kq_dequantize.argtypes = [c_int, p, i64, p, i64, p, c_int]
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


KQUANT_TYPES = {"Q4_K": 12, "Q6_K": 14}  # the GGUF super-block types our kernels multiply as stored (ggml type ids)


def kquant_linear(x: Tensor, blocks: Tensor, type_id: int) -> Tensor:
    """x (M, K) fp32 @ W.T, W (N, bytes per row) a GGUF tensor's Q4_K / Q6_K super-blocks as stored -> (M, N).
    Eager calls go to the kernel directly: the custom op's dispatch alone costs ~25 us a call here, 10x the kernel's
    own fixed cost (quantizing x, the OpenMP fork) and ~3 ms of a 1B model's decoding step."""
    if torch.compiler.is_compiling():
        return kquant_linear_avx2(x, blocks, type_id)
    x = x.contiguous()
    out = x.new_empty(x.shape[0], blocks.shape[0])
    _call(avx2_kernels().kq_linear(type_id, x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), blocks.shape[0],
                                   out.data_ptr(), torch.get_num_threads()))
    return out


@torch.library.custom_op("llama3::kquant_linear_avx2", mutates_args=())
def kquant_linear_avx2(x: Tensor, blocks: Tensor, type_id: int) -> Tensor:
    """kquant_linear as one op for torch.compile (inductor calls it as it is)."""
    return kquant_linear(x, blocks, type_id)


@kquant_linear_avx2.register_fake
def _(x, blocks, type_id):
    return x.new_empty(x.shape[0], blocks.shape[0])


def kquant_dequantize_avx2(blocks: Tensor, type_id: int, rows: Tensor, out: Tensor) -> Tensor:
    """fp32 rows `rows` (int64 indices) of a Q4_K / Q6_K tensor, written into `out` (len(rows), K)."""
    rows = rows.to(torch.int64).contiguous()
    avx2_kernels().kq_dequantize(type_id, blocks.data_ptr(), out.shape[1], rows.data_ptr(), rows.numel(),
                                 out.data_ptr(), torch.get_num_threads())
    return out
