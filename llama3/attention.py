"""Scaled dot-product attention for the model, with the speed choices of each device and mode named in one place.

model.py says what attention computes (grouped-query, causal or masked); this function decides how: which kernel,
in which dtype, in which memory layout. Nothing here changes the result beyond rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, over_cache: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v with grouped-query heads: q (B, T, n_heads, hd), k/v (B, S, n_kv_heads, hd),
    mask boolean (B, 1, T, S) or None for plain causal attention -> (B, T, n_heads, hd) in q's dtype.

    `over_cache`: the keys are a KV cache's (decoding a few tokens over earlier ones)."""
    T, dtype = q.shape[1], q.dtype
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first for the kernels
    if over_cache and T <= 8 and q.device.type == "cpu" and torch.compiler.is_compiling():
        out = attention_by_reduction(q, k, v, mask)
    else:
        if q.device.type == "cpu":  # torch's bf16 attention kernel is ~9x slower than its fp32 one on CPU
            q, k, v = q.float(), k.float(), v.float()
        else:
            q = q.to(k.dtype)  # attention runs in the cache's dtype
        if T > 1:  # the CPU attention kernel runs ~1.5x faster on contiguous heads: worth a copy for a prompt
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2).to(dtype)


def attention_by_reduction(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few queries over a cache, written as the sums it is: q (B, H, T, hd), k/v (B, n_kv_heads, S,
    hd), boolean mask (B, 1, T, S) -> (B, H, T, hd) in fp32.

    For torch.compile on CPU in decoding: inductor turns these into loops that read each cached key and value once,
    widening bf16 to fp32 on the fly, where the attention kernel is an opaque call that costs more than reading
    the cache for one query (and ~9x more still with a bf16 cache). In eager mode it would materialise the
    products; the model uses it only when compiling."""
    B, H, T, hd = q.shape
    n_kv = k.shape[1]
    q = q.float().view(B, n_kv, H // n_kv, T, 1, hd)  # query heads grouped under the key/value head they share
    scores = (q * k.float()[:, :, None, None]).sum(-1) * hd ** -0.5  # (B, n_kv, H/n_kv, T, S)
    probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    out = (probs[..., None] * v.float()[:, :, None, None]).sum(-2)  # (B, n_kv, H/n_kv, T, hd)
    return out.view(B, H, T, hd)
