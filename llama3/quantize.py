"""Weight-only quantization, applied to a Transformer from outside: its nn.Linear / nn.Embedding modules are swapped
for the small modules below; model.py knows nothing about it.

Schemes:
  int8  every linear layer with one scale per output channel (symmetric, q in -127..127).
  int4  the layers' linears in groups of `group_size` input weights with a scale and a zero point each (asymmetric
        min/max, q in 0..15: w = (q - 8) * scale + zero, the convention of torch's int4 kernels).
In both, the embedding and output matrices stay 8-bit per row (llama.cpp's 4-bit files keep them at 8 bits too):
they are the largest and most sensitive matrices, and with tied embeddings they are one tensor.
Loading a GGUF file as int4 on a CPU where our AVX2 kernels run, its Q4_K and Q6_K tensors (the whole of a Q4_K_M
file but its norms: layers, output, embedding) instead stay the file's super-blocks byte for byte (KQuantLinear,
KQuantEmbedding: 4.5 / 6.56 bits a weight, multiplied as stored); other types, and other CPUs, take the forms above.

On CPU the matmuls of a few rows (decoding) run in torch's own kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), which are fast only with bf16 activations. What the rest of the model computes in
depends on the CPU (`compute_dtype`, measured with benchmarks/bench_cpu_kernels.py, see docs/PERFORMANCE.md):
  AVX-512  bf16 activations everywhere (RMSNorm and RoPE still in fp32): its bf16 matmuls are fast.
  AVX2     fp32 activations, as an fp32 model: bf16 matmuls and attention run ~40x slower than fp32 there. Decoding
           rows (up to AVX2_KERNEL_ROWS) go to our int8-activation kernels (llama3/fast.py, 2-2.5x torch's int4
           kernel), in their own int4 layout; where those cannot be compiled, rows up to DEQUANTIZE_ABOVE_ROWS are
           rounded to bf16 for torch's kernels. More rows (prompts) dequantize the weight to fp32 a tile of rows at
           a time and use the fp32 matmul, so a quantized prompt runs at fp32 speed rather than bf16's.
Other devices dequantize on the fly (exact, and fused by torch.compile).

The portable form (what `quantize_state_dict` returns and `llama3 quantize` writes) is device-independent:
  int8 linear/embedding  NAME.weight int8 (out, in), NAME.scales bf16 (out,)
  int4 linear            NAME.weight uint8 (out, in/2): element 2i in the low nibble, 2i+1 in the high one;
                         NAME.scales, NAME.zeros (out, in/group_size): bf16 when quantized here, fp32 when
                         repacked from GGUF 4-bit blocks (the file's values, rounded once only by the kernel's dtype)
  norms                  bf16
Kernel-specific packing happens when a model is built for a device (`_cpu_kernel` picks the kernel, and with it
the layout).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gguf.quants

from .args import ModelArgs
from .fast import (KQUANT_TYPES, avx2_kernels, int4_dequantize_avx2, int4_linear_avx2, int8_linear_avx2,
                   kquant_dequantize_avx2, kquant_linear)
from .model import Transformer, meta_model
from .weights import Checkpoint
from .weights.gguf import GGUFTensor, dequantize

SCHEMES = ("int8", "int4")
SCALE_DTYPE = torch.bfloat16  # portable scales, and the activations of torch's CPU int8/int4 kernels (10-40x slower
#                               with fp32 activations)
DEQUANTIZE_ABOVE_ROWS = 32  # AVX2: more rows than this dequantize to fp32 (measured crossover 16-64 rows)
AVX2_KERNEL_ROWS = 8  # AVX2 with our int8-activation kernels: up to this many rows use them, more dequantize
_ROWS_PER_CHUNK = 4096  # quantize big matrices a slice of rows at a time so fp32 temporaries stay small
_TILE_WEIGHTS = 1 << 20  # weights per dequantized fp32 tile (4 MB: stays in cache for the matmul that reads it)


class QuantizationError(ValueError):
    pass


def fast_bf16_cpu() -> bool:
    """Whether this CPU runs torch's bf16 matmuls fast: AVX-512 builds do (avx512_bf16 / VNNI on the CPUs we
    measured); on AVX2-only CPUs they run ~40x slower than fp32."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def compute_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The activation dtype of a quantized model on this device."""
    return torch.float32 if torch.device(device).type == "cpu" and not fast_bf16_cpu() else torch.bfloat16


# ---- the math -------------------------------------------------------------------------------------------------

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float -> int8 weights and one scale per row (symmetric: w ~= q * scale)."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], dtype=SCALE_DTYPE)
    for r in range(0, w.shape[0], _ROWS_PER_CHUNK):
        chunk = w[r:r + _ROWS_PER_CHUNK].float()
        s = _round_up_to_scale_dtype(chunk.abs().amax(dim=1).clamp(min=1e-10) / 127)
        q[r:r + _ROWS_PER_CHUNK] = torch.round(chunk / s.float()[:, None]).clamp_(-127, 127)
        scales[r:r + _ROWS_PER_CHUNK] = s
    return q, scales


def _round_up_to_scale_dtype(x: Tensor) -> Tensor:
    """The smallest bf16 >= x: rounding the scale down could push the largest weights past the end of the grid."""
    y = x.to(SCALE_DTYPE)
    return torch.where(y.float() < x, torch.nextafter(y, torch.tensor(float("inf"), dtype=SCALE_DTYPE)), y)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out, in) float -> nibble-packed uint8 (out, in/2), scales and zeros (out, in/group_size).

    Each group maps its [min, max] onto 0..15; w ~= (q - 8) * scale + zero with zero = min + 8 * scale."""
    rows, cols = w.shape
    if cols % group_size:
        raise QuantizationError(f"int4 group size {group_size} does not divide the input dimension {cols}; "
                                f"choose a divisor of {cols} (e.g. 32)")
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group_size, dtype=SCALE_DTYPE)
    zeros = torch.empty(rows, cols // group_size, dtype=SCALE_DTYPE)
    for r in range(0, rows, _ROWS_PER_CHUNK):
        g = w[r:r + _ROWS_PER_CHUNK].float().reshape(-1, cols // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        # Round scale and zero to bf16 first and pick each q against the rounded grid the kernel will use.
        scale = _round_up_to_scale_dtype(((hi - lo) / 15).clamp(min=1e-10))
        zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
        lo = zero.float() - 8 * scale.float()
        q = torch.round((g - lo[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
        packed[r:r + _ROWS_PER_CHUNK] = pack_nibbles(q.reshape(q.shape[0], cols))
        scales[r:r + _ROWS_PER_CHUNK], zeros[r:r + _ROWS_PER_CHUNK] = scale, zero
    return packed, scales, zeros


def pack_nibbles(q: Tensor) -> Tensor:
    """(rows, cols) values 0..15 -> (rows, cols/2) uint8, element 2i in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(rows, cols/2) uint8 -> (rows, cols) uint8 values 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    q = unpack_nibbles(packed)
    rows, groups = scales.shape
    q = q.reshape(rows, groups, -1).to(scales.dtype)
    return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(rows, -1)


# ---- modules swapped into the model ---------------------------------------------------------------------------

class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel = _cpu_kernel(weight)
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the activation dtype
        if self.kernel != "none":  # each kernel wants its scales in its own dtype (torch's: bf16)
            self.register_buffer("kernel_scales", scales.to(torch.float32 if self.kernel == "avx2" else SCALE_DTYPE),
                                 persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight.to(x.dtype)) * self.scales
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "avx2" and x2.shape[0] <= AVX2_KERNEL_ROWS:
            out = int8_linear_avx2(x2.float(), self.weight, self.kernel_scales)
        elif _dequantizes(x2) or self.kernel == "avx2":
            out = _tiled_matmul(x2.float(), self.out_features, self.dequantize_rows)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x2.to(SCALE_DTYPE), self.weight, self.kernel_scales)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, start: int, end: int, out: Tensor) -> Tensor:
        """fp32 weights of output rows start..end, written into `out` (end - start, in)."""
        return out.copy_(self.weight[start:end]).mul_(self.scales[start:end, None])  # 1.6x torch.mul(..., out=)


class Int4Linear(nn.Module):
    def __init__(self, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        self.kernel = _cpu_kernel(packed, group_size)
        if self.kernel == "avx2":  # our kernel's layout (llama3/fast.py): 16 bytes a group, bf16 scales and zeros
            self.register_buffer("weight", pack_groups_for_avx2(packed))
            self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())
            self.register_buffer("zeros", zeros.to(SCALE_DTYPE).contiguous())
        elif packed.device.type == "cpu":
            # The CPU kernel's own layouts: weights interleaved in blocks of rows, scales and zeros (in/g, out, 2).
            self.register_buffer("weight", pack_for_cpu_kernel(unpack_nibbles(packed)))
            self.register_buffer("scales_and_zeros",
                                 torch.stack((scales.t(), zeros.t()), dim=-1).to(SCALE_DTYPE).contiguous())
        else:
            self.register_buffer("weight", packed)
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.linear(x, dequantize_int4(self.weight, self.scales, self.zeros).to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "avx2":
            if x2.shape[0] <= AVX2_KERNEL_ROWS:
                out = int4_linear_avx2(x2.float(), self.weight, self.scales, self.zeros)
            else:
                out = _tiled_matmul(x2.float(), self.out_features, self.dequantize_rows)
        elif _dequantizes(x2) and _kernel_layout_rows(self.out_features):
            out = _tiled_matmul(x2, self.out_features, self.dequantize_rows)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(SCALE_DTYPE), self.weight, self.group_size,
                                                             self.scales_and_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, start: int, end: int, out: Tensor) -> Tensor:
        """fp32 weights of output rows start..end (whole blocks of the kernel's layout), written into `out`."""
        if self.kernel == "avx2":
            return int4_dequantize_avx2(self.weight, self.scales, self.zeros, start, end, out)
        block = _kernel_layout_rows(self.out_features)
        packed = self.weight[start:end].view(-1, self.in_features, block // 2)  # (row block, column, row in half)
        q = out.view(-1, 2, block // 2, self.in_features)  # (row block, low/high half, row in half, column)
        q[:, 0].copy_((packed & 0x0F).transpose(1, 2))
        q[:, 1].copy_((packed >> 4).transpose(1, 2))
        sz = self.scales_and_zeros[:, start:end].float()  # (groups, rows, 2)
        scales, zeros = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (rows, groups, 1)
        groups = out.view(end - start, -1, self.group_size)
        return torch.addcmul(zeros - 8 * scales, groups, scales, out=groups).view_as(out)


def _cpu_kernel(weight: Tensor, group_size: int = 32) -> str:
    """Which kernel decodes with this weight: "avx2" (ours, int8 activations: AVX2-only CPUs where it compiled),
    "torch" (torch's int8/int4 kernels, bf16 activations) or "none" (not on the CPU)."""
    if weight.device.type != "cpu":
        return "none"
    in_features = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    return "avx2" if group_size == 32 and in_features % 32 == 0 and avx2_kernels() else "torch"


def pack_groups_for_avx2(packed: Tensor) -> Tensor:
    """Portable nibbles (element 2i low, 2i+1 high) -> our AVX2 layout: per group of 32, byte j holds weight j
    in the low nibble and weight j + 16 in the high one."""
    q = unpack_nibbles(packed)
    groups = q.view(q.shape[0], -1, 2, 16)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def _dequantizes(x: Tensor) -> bool:
    """fp32 activations of many rows (a prompt on an AVX2 CPU): dequantize and use the fp32 matmul."""
    return x.dtype == torch.float32 and x.shape[0] > DEQUANTIZE_ABOVE_ROWS


def _tiled_matmul(x: Tensor, out_features: int, dequantize_rows) -> Tensor:
    """x (M, in) @ W.T with W dequantized to fp32 a tile of output rows at a time into one reused buffer, so the
    full-precision matrix never exists and each tile is still in cache when the matmul reads it."""
    rows = max(64, _TILE_WEIGHTS // x.shape[1] // 64 * 64)  # whole 64-row blocks (the kernel layouts' unit)
    out = x.new_empty(x.shape[0], out_features)
    buffer = x.new_empty(min(rows, out_features), x.shape[1])
    for start in range(0, out_features, rows):
        end = min(start + rows, out_features)
        out[:, start:end] = F.linear(x, dequantize_rows(start, end, buffer[:end - start]))
    return out


def pack_for_cpu_kernel(q: Tensor) -> Tensor:
    """(out, in) uint8 values 0..15 -> the layout of torch's CPU int4 kernel.

    torch's converter wants one int32 per weight (4x the memory, slow for big models). Its layout is simple: per
    block of B rows (64 with AVX-512, 32 with AVX2) and per column, B/2 bytes holding row j in the low nibble and
    row j + B/2 in the high one. We write that directly when a probe shows this machine's converter uses it, and
    defer to torch otherwise."""
    block = _kernel_layout_rows(q.shape[0])
    if not block:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    return _pack_blocks(q, block)


def _pack_blocks(q: Tensor, block: int) -> Tensor:
    rows, cols = q.shape
    blocks = q.view(rows // block, 2, block // 2, cols)  # (row block, low/high half, row in half, column)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).contiguous().view(rows, cols // 2)


def _kernel_layout_rows(rows: int) -> int | None:
    """The block of rows of torch's int4 layout on this CPU, if we know it and it divides `rows`."""
    block = _cpu_layout_block()
    return block if block and rows % block == 0 else None


@functools.cache
def _cpu_layout_block() -> int | None:
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.int(), 1)
    return next((block for block in (64, 32) if torch.equal(_pack_blocks(probe, block), theirs)), None)


class KQuantLinear(nn.Module):
    """A linear layer held as a GGUF file's Q4_K / Q6_K super-blocks byte for byte (4.5 / 6.56 bits a weight), for
    AVX2-only CPUs: decoding rows go to our kernels (llama3/fast.py: x in int8 per 256, integer sub-block scales,
    one float multiply per 256 weights), more rows to fp32 matmuls on dequantized tiles."""

    def __init__(self, blocks: Tensor, kind: str, in_features: int):
        super().__init__()
        self.out_features, self.in_features = blocks.shape[0], in_features
        self.kind, self.type_id = kind, KQUANT_TYPES[kind]
        self.register_buffer("weight", blocks)  # (out, bytes per row) uint8, the file's blocks

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] <= AVX2_KERNEL_ROWS:
            out = kquant_linear(x2, self.weight, self.type_id)
        else:
            out = _tiled_matmul(x2, self.out_features, self.dequantize_rows)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, start: int, end: int, out: Tensor) -> Tensor:
        return kquant_dequantize_avx2(self.weight, self.type_id, torch.arange(start, end), out)


class KQuantEmbedding(nn.Module):
    """The embedding in Q4_K / Q6_K super-blocks: a lookup dequantizes its rows. With tied embeddings the output
    projection is a KQuantLinear on the same blocks, so one copy serves both."""

    def __init__(self, blocks: Tensor, kind: str, dim: int):
        super().__init__()
        self.dim, self.kind, self.type_id = dim, kind, KQUANT_TYPES[kind]
        self.register_buffer("weight", blocks)  # (vocab, bytes per row) uint8

    def forward(self, tokens: Tensor) -> Tensor:
        out = torch.empty(tokens.numel(), self.dim)
        return kquant_dequantize_avx2(self.weight, self.type_id, tokens.flatten(), out).view(*tokens.shape, self.dim)


class Int8Embedding(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (vocab, dim) int8
        self.register_buffer("scales", scales)  # (vocab,)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight).to(self.scales.dtype) * self.scales[tokens].unsqueeze(-1)


QUANTIZED_MODULES = {cls.__name__: cls for cls in (Int8Linear, Int4Linear, Int8Embedding, KQuantLinear,
                                                   KQuantEmbedding)}


def module_state(module: nn.Module) -> dict:
    """A quantized module as built for its device (kernel layouts included): its class, sizes and buffers, for
    `restore_module` to rebuild it without converting anything again (llama3/weights/cache.py keeps these)."""
    sizes = {k: v for k, v in vars(module).items() if type(v) in (int, str)}
    persistent = [k for k in module._buffers if k not in module._non_persistent_buffers_set]
    return {"kind": type(module).__name__, "sizes": sizes, "buffers": dict(module._buffers), "persistent": persistent}


def restore_module(state: dict) -> nn.Module:
    module = nn.Module.__new__(QUANTIZED_MODULES[state["kind"]])
    nn.Module.__init__(module)
    vars(module).update(state["sizes"])
    for name, t in state["buffers"].items():
        module.register_buffer(name, t, persistent=name in state["persistent"])
    return module.eval()


# ---- state dicts: float or GGUF blocks -> portable quantized tensors -> model ---------------------------------------

def is_layer_linear(name: str) -> bool:
    """The projections inside the blocks (not embeddings, output or norms)."""
    return name.startswith("layers.") and name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight",
                                                         "w1.weight", "w2.weight", "w3.weight"))


def quantize_tensor(name: str, w: Tensor | GGUFTensor, scheme: str, group_size: int,
                    keep_blocks: bool = False) -> dict[str, Tensor]:
    """One tensor of a Meta-named state dict (floats, or a GGUF file's blocks) -> its portable quantized tensors."""
    if isinstance(w, GGUFTensor):
        return _quantize_gguf_tensor(name, w, scheme, group_size, keep_blocks)
    base = name.removesuffix(".weight")
    if w.ndim == 1:  # norms
        return {name: w.to(SCALE_DTYPE)}
    if scheme == "int4" and is_layer_linear(name):
        packed, scales, zeros = quantize_int4(w, group_size)
        return {name: packed, f"{base}.scales": scales, f"{base}.zeros": zeros}
    q, scales = quantize_int8(w)
    return {name: q, f"{base}.scales": scales}


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def quantize_state_dict(state_dict: dict[str, Tensor | GGUFTensor], scheme: str, group_size: int = 32,
                        keep_blocks: bool = False) -> dict[str, Tensor]:
    """Quantize a state dict tensor by tensor, dropping each input as soon as it is converted (the dict is
    consumed), so peak memory stays near the inputs plus one quantized copy. GGUF blocks (`GGUFTensor`) are read
    one at a time: 4-bit blocks are repacked as they are, the rest goes through fp32 a slice of rows at a time.
    keep_blocks (int4, for a CPU with our AVX2 kernels): Q4_K / Q6_K tensors stay the file's super-blocks
    (NAME.Q4_K_blocks, NAME.Q6_K_blocks: uint8 (rows, bytes per row)), which only those kernels multiply."""
    check_scheme(scheme)
    out = {}
    for name in list(state_dict):
        out.update(quantize_tensor(name, state_dict.pop(name), scheme, group_size, keep_blocks))
    return out


def quantize_checkpoint(ckpt: Checkpoint, scheme: str, group_size: int = 32, keep_blocks: bool = False) -> Checkpoint:
    """A checkpoint read with `read_checkpoint(path, blocks=True)` -> the same with quantized tensors (portable
    unless keep_blocks: see quantize_state_dict)."""
    done = ckpt.metadata.get("quantization")
    if done:
        if done["scheme"] != scheme:
            raise QuantizationError(f"the checkpoint is already quantized as {done['scheme']}; re-quantize from "
                                    f"the original checkpoint instead")
        return ckpt
    ckpt.state_dict = quantize_state_dict(ckpt.state_dict, scheme, group_size, keep_blocks)
    ckpt.metadata["quantization"] = {"scheme": scheme, "group_size": group_size}
    return ckpt


# Blocks that are exactly int4 with one scale and one zero per 32 weights (w = (q - 8) * scale + zero).
_INT4_BLOCKS = ("Q4_0", "Q4_1", "Q4_K")
# Types that llama.cpp's K-quant mixes choose to keep above 4 bits (output, about half of attn_v / ffn_down): the
# int4 scheme keeps them at int8 per channel instead of rounding them to a coarser grid than the file's
# (benchmarks/bench_gguf_types.py: error and speed of each representation).
_ABOVE_4_BITS = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")


def _quantize_gguf_tensor(name: str, t: GGUFTensor, scheme: str, group_size: int,
                          keep_blocks: bool) -> dict[str, Tensor]:
    raw = t.raw()  # (rows, bytes per row)
    if keep_blocks and scheme == "int4" and t.kind in KQUANT_TYPES and len(t.shape) == 2:
        return {f"{name.removesuffix('.weight')}.{t.kind}_blocks": raw}
    if t.kind in _INT4_BLOCKS and scheme == "int4" and group_size == 32 and is_layer_linear(name):
        q, scales, zeros = int4_of_gguf_blocks(raw, t.kind)
        base = name.removesuffix(".weight")
        return {name: pack_nibbles(q), f"{base}.scales": scales, f"{base}.zeros": zeros}
    if t.kind in _ABOVE_4_BITS and scheme == "int4":
        scheme = "int8"
    parts = []  # through fp32 a slice of rows at a time, so the fp32 copy of the embedding never exists whole
    for r in range(0, raw.shape[0], _ROWS_PER_CHUNK):
        rows = raw[r:r + _ROWS_PER_CHUNK]
        w = dequantize(rows, t.kind, rows.shape[0]).reshape(-1, *t.shape[1:])
        parts.append(quantize_tensor(name, w, scheme, group_size))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def int4_of_gguf_blocks(raw: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """GGUF Q4_0 / Q4_1 / Q4_K rows (rows, bytes per row) -> q (rows, cols) in 0..15 and fp32 scales and zeros
    (rows, cols / 32) with w = (q - 8) * scale + zero: the same codes, not a new rounding.

    Q4_0 / Q4_1 blocks hold 32 weights: fp16 d (Q4_1: and fp16 min m), 16 bytes whose low nibbles are weights 0..15
    and high nibbles 16..31; w = d * (q - 8) or d * q + m, so scale = d and zero = 0 or m + 8d. Q4_K super-blocks
    hold 256 weights: fp16 d and dmin, eight 6-bit (sc, m) pairs in 12 bytes, then four 32-byte chunks whose low
    nibbles are sub-block 2c and high nibbles 2c + 1; w = d*sc*q - dmin*m, so scale = d*sc, zero = 8*d*sc - dmin*m.
    """
    rows = raw.shape[0]
    if kind == "Q4_K":
        b = raw.reshape(rows, -1, 144)  # (rows, super-blocks, 144 bytes)
        d, dmin = (b[..., i:i + 2].contiguous().view(torch.float16).float() for i in (0, 2))  # (rows, sb, 1)
        sc, m = (torch.from_numpy(x).float().reshape(rows, -1, 8)
                 for x in gguf.quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12).numpy()))
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)
        q = torch.cat((qs & 0x0F, qs >> 4), dim=3)  # (rows, sb, chunk, low/high, 32)
        scale = d * sc
        return q.reshape(rows, -1), scale.reshape(rows, -1), (8 * scale - dmin * m).reshape(rows, -1)
    b = raw.reshape(rows, -1, 18 if kind == "Q4_0" else 20)  # (rows, blocks, block bytes)
    d = b[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
    qs = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(rows, -1)
    if kind == "Q4_1":
        return q, d, b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d
    return q, d, torch.zeros_like(d)


def detect_scheme(state_dict: dict[str, Tensor]) -> str:
    return "int4" if any(k.endswith(".zeros") for k in state_dict) else "int8"


def build_quantized_model(args: ModelArgs, state_dict: dict[str, Tensor], *, group_size: int,
                          device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer whose linears and embeddings are the quantized modules, from portable quantized tensors
    (consumed as they are placed, so each exists once), computing in `dtype` (default: compute_dtype(device))."""
    dtype = dtype or compute_dtype(device)
    model = meta_model(args)
    sd = state_dict

    def take(name: str) -> Tensor:
        if name not in sd:
            raise QuantizationError(f"quantized checkpoint is missing tensor {name!r}")
        t = sd.pop(name).to(device)
        return t.to(dtype) if t.is_floating_point() else t

    def kquant(name: str) -> str | None:
        """The K-quant type of a tensor kept as GGUF blocks (quantize_state_dict's keep_blocks), if it is one."""
        kind = next((k for k in KQUANT_TYPES if f"{name}.{k}_blocks" in sd), None)
        if kind and not avx2_kernels():
            raise QuantizationError(f"{name} is held as GGUF {kind} blocks, which only our AVX2 kernels multiply")
        return kind

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "output":
            if kind := kquant(name):
                new = KQuantLinear(take(f"{name}.{kind}_blocks"), kind, module.in_features)
            elif f"{name}.zeros" in sd:
                new = Int4Linear(take(f"{name}.weight"), take(f"{name}.scales"), take(f"{name}.zeros"), group_size)
            else:
                new = Int8Linear(take(f"{name}.weight"), take(f"{name}.scales"))
            model.set_submodule(name, new)
    if kind := kquant("tok_embeddings"):
        model.tok_embeddings = KQuantEmbedding(take(f"tok_embeddings.{kind}_blocks"), kind, args.dim)
    else:
        model.tok_embeddings = Int8Embedding(take("tok_embeddings.weight"), take("tok_embeddings.scales"))
    if args.tie_embeddings:  # one copy of the matrix serves the lookup and the output projection
        embedding = model.tok_embeddings
        model.output = (KQuantLinear(embedding.weight, embedding.kind, args.dim) if kind else
                        Int8Linear(embedding.weight, embedding.scales))
    elif out_kind := kquant("output"):
        model.output = KQuantLinear(take(f"output.{out_kind}_blocks"), out_kind, args.dim)
    else:
        model.output = Int8Linear(take("output.weight"), take("output.scales"))
    norms = {k: take(k) for k in list(sd) if k.endswith("norm.weight")}
    model.load_state_dict(norms, strict=False, assign=True)
    if sd:
        raise QuantizationError(f"quantized checkpoint has unexpected tensors: {sorted(sd)[:5]}")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise QuantizationError(f"quantized checkpoint is missing tensors: {left[:5]}")
    return model.eval().requires_grad_(False)


def quantize_model(model: Transformer, scheme: str, group_size: int = 32) -> Transformer:
    """Quantize a float model (e.g. one just loaded or trained): returns the quantized model on its device."""
    device = model.norm.weight.device
    sd = {k: v for k, v in model.state_dict().items() if not (model.args.tie_embeddings and k == "output.weight")}
    return build_quantized_model(model.args, quantize_state_dict({k: v.cpu() for k, v in sd.items()}, scheme,
                                                                 group_size), group_size=group_size, device=device)


def quantize(src: str, dst: str, *, int8: bool = False, int4: bool = False, group_size: int = 32) -> None:
    """Quantize a checkpoint's weights and write a directory that `llama3.load` (and every --model option) reads.

    Args:
        src: source checkpoint: .gguf file, Meta or HF directory, or known model name
        dst: output directory
        int8: 8-bit weights with one scale per output channel
        int4: 4-bit weights in groups along the input dimension (embeddings and output stay 8-bit)
        group_size: weights per int4 group, a divisor of the layers' input sizes (32 keeps GGUF 4-bit blocks exactly)
    """
    from pathlib import Path

    from .export import save_tokenizer
    from .hub import resolve
    from .weights import read_checkpoint
    from .weights.quantized import write_quantized
    if int8 == int4:
        raise QuantizationError("choose exactly one of --int8 and --int4")
    scheme = "int8" if int8 else "int4"
    ckpt = quantize_checkpoint(read_checkpoint(resolve(src), blocks=True), scheme, group_size)
    out = Path(dst)
    write_quantized(out, ckpt.args, ckpt.state_dict, scheme=scheme, group_size=group_size)
    save_tokenizer(ckpt.tokenizer, ckpt.chat_template, out, layout="hf")
    size = sum(t.numel() * t.element_size() for t in ckpt.state_dict.values())
    print(f"{out}: {scheme} weights, {size / 1e6:.1f} MB")
