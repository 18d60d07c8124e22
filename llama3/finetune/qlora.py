"""4-bit frozen weights for QLoRA: NF4 (normal-float, the QLoRA paper's code) or int4 (symmetric integers).

Weights are cut into blocks of `block_size` consecutive values (row-major); each block keeps one fp16 scale and
16-level codes packed two to a byte, so a weight costs 4 + 16/block_size bits. The matmul dequantizes the weight
on the fly and the backward pass dequantizes it again, so no full-precision copy of a frozen weight outlives the
layer that uses it.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantKind = Literal["nf4", "int4"]


def nf4_levels() -> Tensor:
    """The 16 NF4 values in [-1, 1]: quantiles of a standard normal, so that normally distributed weights (scaled
    by their block's absolute maximum) fill every level about equally. 8 levels above zero, 7 below and an exact
    zero; the outermost quantile probability is chosen halfway between the symmetric constructions for 15 and 16
    levels, as in the QLoRA paper."""
    offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def quantize_4bit(weight: Tensor, kind: QuantKind = "nf4", block_size: int = 64) -> tuple[Tensor, Tensor]:
    """weight -> (packed uint8 codes (n_blocks, block_size / 2), fp16 scales (n_blocks, 1))."""
    if block_size % 2:
        raise ValueError(f"block_size must be even, got {block_size}")
    flat = weight.detach().float().flatten()
    flat = F.pad(flat, (0, -flat.numel() % block_size))
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float16).tiny)
    if kind == "nf4":
        scales = absmax.half()
        levels = nf4_levels().to(weight.device)
        # Nearest level: count how many midpoints between consecutive levels lie below the value.
        codes = torch.bucketize(blocks / scales.float(), (levels[1:] + levels[:-1]) / 2)
    elif kind == "int4":
        scales = (absmax / 7).half()
        codes = (blocks / scales.float()).round().clamp(-8, 7) + 8
    else:
        raise ValueError(f"unknown 4-bit kind {kind!r}: use 'nf4' or 'int4'")
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales


@functools.cache
def byte_values(kind: QuantKind, device: torch.device) -> Tensor:
    """(256, 2): the values of the low and high code packed in each possible byte, before scaling."""
    levels = nf4_levels() if kind == "nf4" else torch.arange(-8, 8, dtype=torch.float32)
    byte = torch.arange(256)
    return levels[torch.stack([byte & 0x0F, byte >> 4], dim=-1)].to(device)


def dequantize_4bit(packed: Tensor, scales: Tensor, kind: QuantKind, shape: torch.Size,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    # One table lookup per byte, with int32 indices: this runs twice per layer and step, and its temporaries
    # are what QLoRA holds beyond the 4-bit weights.
    values = F.embedding(packed.int(), byte_values(kind, packed.device))  # (n_blocks, block_size / 2, 2)
    values = values.view(packed.shape[0], -1).mul_(scales.float())
    return values.flatten()[:shape.numel()].view(shape).to(dtype)


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T with W rebuilt from its 4-bit codes in forward and again in backward: autograd would otherwise
    keep every layer's full-precision W alive until the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: Linear4bit) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class Linear4bit(nn.Module):
    """A frozen, bias-free linear layer stored in 4 bits. Its codes and scales are buffers, not parameters: they
    are never trained, and data-parallel wrappers leave them whole on every rank."""

    def __init__(self, weight: Tensor, kind: QuantKind = "nf4", block_size: int = 64):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kind, self.block_size, self.dtype = kind, block_size, weight.dtype
        packed, scales = quantize_4bit(weight, kind, block_size)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: QuantKind = "nf4", block_size: int = 64) -> Linear4bit:
        if linear.bias is not None:
            raise ValueError("Linear4bit has no bias; the Llama model has none")
        return cls(linear.weight, kind, block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize_4bit(self.packed, self.scales, self.kind, shape, dtype or self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _DequantizedLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}, " \
               f"block_size={self.block_size}"
