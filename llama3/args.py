"""Model hyper-parameters and the named presets of the Llama 3 family."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (long context without retraining short-context behaviour)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    hidden_dim: int | None = None  # None: Meta's formula from multiple_of and ffn_dim_multiplier
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attn = self.dim * (self.dim + 2 * kv_dim) + self.dim * self.dim
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model arguments: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
# Llama 3.2 1B/3B: Meta's reference code hard-codes factor 8, while the released HF configs say 32. The presets follow
# the configs published with the weights (32); loaders always take the value from the checkpoint itself.
_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)

PRESETS: dict[str, ModelArgs] = {
    "llama3-8b": ModelArgs(),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, multiple_of=4096),
    "llama3.1-8b": ModelArgs(rope_scaling=_LLAMA31_ROPE, max_seq_len=131072),
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, multiple_of=4096, rope_scaling=_LLAMA31_ROPE,
                              max_seq_len=131072),
    "llama3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2,
                               rope_scaling=_LLAMA31_ROPE, max_seq_len=131072),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5,
                             rope_scaling=_LLAMA32_ROPE, max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0,
                             rope_scaling=_LLAMA32_ROPE, max_seq_len=131072, tie_embeddings=True),
    # The default model's shape (SmolLM2-135M): a Llama with a small GPT-2-style vocabulary.
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                              rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # Small shapes for tests, debugging and CPU training runs; they use the Llama 3 vocabulary.
    "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=None,
                       max_seq_len=2048),
    "debug-tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                            ffn_dim_multiplier=None, max_seq_len=256),
}
