"""The Llama 3 Transformer, single device, readable top to bottom.

RMSNorm (fp32) -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU feed-forward, repeated n_layers times.
Parameter names follow Meta's checkpoints so they load without renaming. Parallelism, quantization, LoRA and
serving wrap this module from outside; nothing here knows about them.
"""

from __future__ import annotations

import math
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .args import ModelArgs
from .attention import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (bf16 loses the small variances), then scale in the activation dtype, as Meta does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1's scaling of the low frequencies when configured."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    s = args.rope_scaling
    if s is None:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    # Short wavelengths stay as trained; long ones are stretched by `factor`; the band between is interpolated.
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_cos_sin(args: ModelArgs, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of position * frequency for each token: positions (B, T) -> two (B, T, 1, head_dim/2) fp32 tensors."""
    angles = positions.float()[..., None] * rope_frequencies(args, positions.device)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the token's angle, in fp32 (Meta's complex-number RoPE).

    As one complex multiply: a single vectorised pass forward and backward, where the same rotation written with
    strided real halves takes several passes (4-10x slower on CPU, which dominated training time)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, head_dim/2, 2)
    if torch.compiler.is_compiling():
        # The same products in real arithmetic: inductor generates no code for complex tensors (it would fall back
        # to eager kernels) but fuses this form into one loop.
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)
    xc = torch.view_as_complex(pairs)
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)


class KVCache:
    """Static, preallocated keys and values of every layer: (n_layers, max_batch, max_seq_len, n_kv_heads, head_dim).

    Batch row b of a forward pass uses cache row b. Entries past a row's current position may hold stale values;
    the attention mask hides them, and they are zero-initialised so they can never inject NaNs.
    """

    def __init__(self, args: ModelArgs, max_batch: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or args.max_seq_len
        shape = (args.n_layers, max_batch, self.max_seq_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, xk: Tensor, xv: Tensor, positions: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values at their positions; return each row's first kv_len cached entries."""
        B = xk.shape[0]
        rows = torch.arange(B, device=xk.device)[:, None]
        # One index_put_ on the whole tensor (not on a per-layer view): torch.compile then updates it in place
        # instead of copying the cache for every layer.
        index = (torch.full_like(positions, layer), rows.expand_as(positions), positions)
        self.k.index_put_(index, xk.to(self.k.dtype))
        self.v.index_put_(index, xv.to(self.v.dtype))
        return self.k[layer, :B, :kv_len], self.v[layer, :B, :kv_len]

    def copy_rows(self, dst_rows, src: KVCache, src_rows, length: int) -> None:
        """Copy the first `length` positions of `src`'s rows into rows of this cache, in every layer (moving a
        request between batches, or sharing a computed prefix)."""
        for dst_layers, src_layers in ((self.k, src.k), (self.v, src.v)):
            for dst, s in zip(dst_layers, src_layers):
                dst[dst_rows, :length] = s[src_rows, :length]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, positions: Tensor | None = None, kv_len: int = 0) -> Tensor:
        B, T, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cached_k, cached_v = cache.update(self.layer_id, k, v, positions, kv_len)
            if mask is not None:  # attend to earlier cached positions too (a prompt from an empty cache has none)
                k, v = cached_k, cached_v  # (B, kv_len, n_kv_heads, head_dim)
        out = attention(q, k, v, mask, over_cache=cache is not None and mask is not None)  # (B, T, n_heads, hd)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, positions: Tensor | None = None, kv_len: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, positions, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                attn_mask: Tensor | None = None, logits_index: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32.

        positions: (B, T) absolute position of each token (default 0..T-1). With a cache, keys/values are stored
        at these positions and a query at position p attends to its row's cached positions <= p; without
        positions the cache is taken to start empty (a prompt's prefill), and attention is plainly causal.
        attn_mask: boolean (B, 1, T, S) mask overriding the causal one (e.g. document masking in training).
        logits_index: (B,) index along T of the only token whose logits are wanted (e.g. the last prompt token).
        """
        B, T = tokens.shape
        from_start = positions is None
        if from_start:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_cos_sin(self.args, positions)
        kv_len = 0
        if cache is not None and attn_mask is not None:
            kv_len = attn_mask.shape[-1]  # the caller's mask covers the cached positions; no host sync needed
        elif cache is not None and from_start:
            kv_len = T  # is_causal: the attention kernel skips the masked half instead of reading a mask
            if kv_len > cache.max_seq_len:
                raise ValueError(f"position {kv_len - 1} is past the KV cache length {cache.max_seq_len}")
        elif cache is not None:
            kv_len = int(positions.max()) + 1
            if kv_len > cache.max_seq_len:
                raise ValueError(f"position {kv_len - 1} is past the KV cache length {cache.max_seq_len}")
            attn_mask = torch.arange(kv_len, device=tokens.device) <= positions[:, None, :, None]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache, positions, kv_len)
        if logits_index is not None:
            h = h[torch.arange(B, device=h.device), logits_index][:, None]  # (B, 1, dim)
        return self.output(self.norm(h)).float()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for pretraining: N(0, std), output projections scaled down with depth (as GPT-2 does)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, std=std)


def meta_model(args: ModelArgs) -> Transformer:
    """The model on the meta device: shapes only, no memory, to be filled with load_state_dict(assign=True).

    nn.Embedding's default initialisation is skipped: normal_ has no meta kernel in torch 2.13, so it runs a Python
    reference that first imports torch._dynamo, seconds spent on weights that are about to be replaced."""
    with torch.device("meta"), patch.object(nn.Embedding, "reset_parameters", lambda self: None):
        return Transformer(args)
