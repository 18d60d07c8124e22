"""GGUF files (llama.cpp) of architecture `llama`: metadata -> ModelArgs, tensors dequantized with vectorized torch.

llama.cpp's converter already undoes HF's q/k permutation, so GGUF q/k rows are in Meta's interleaved order.
Block formats (ggml-common.h): Q8_0 = fp16 scale + 32 int8; Q4_0 = fp16 scale + 32 4-bit values (offset 8);
Q4_1 = fp16 scale + fp16 min + 32 4-bit values. Low nibbles are elements 0..15 of a block, high nibbles 16..31.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from . import Checkpoint, WeightsError

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # each block holds 32 weights
_ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}  # ggml type ids we can read
# Metadata value types of the GGUF format: scalars by struct code; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_CHUNK_ELEMENTS = 1 << 22  # dequantize in slices of ~4M weights so temporaries stay ~16 MB


def meta_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: str  # F32, F16, BF16, Q8_0, Q4_0, Q4_1, or "type N" for a type we cannot read
    shape: tuple[int, ...]  # PyTorch order (GGUF lists dims fastest-first)
    offset: int  # absolute position of the data in the file
    nbytes: int


class GGUFFile:
    """The metadata and tensor directory of a GGUF file, parsed in one pass over a memory map.

    Tensor bytes are read on demand, one tensor at a time (`read`), so a loader holds at most one raw tensor
    besides its results. (The gguf package's reader builds numpy views of every metadata item: seconds for a
    49k-token vocabulary; this parser takes milliseconds.)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as self._map:
                self._parse()
        except (struct.error, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise WeightsError(f"{self.path}: unreadable GGUF file (truncated or corrupted?): {e}") from None

    def _parse(self) -> None:
        buf, self._pos = self._map, 0
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF":
            raise ValueError(f"bad magic {magic!r}")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (supported: 2, 3)")
        self._pos = 8
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I")[0])
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")[0]
            dims = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in reversed(dims)), type_id, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, type_id, offset in infos:
            kind = _TENSOR_TYPES.get(type_id, f"type {type_id}")
            numel = int(np.prod(shape)) if shape else 1
            if kind in BLOCK_BYTES:
                nbytes = numel // 32 * BLOCK_BYTES[kind]
            else:
                nbytes = numel * _ELEMENT_BYTES.get(kind, 0)
            self.tensors[name] = GGUFTensor(name, kind, shape, data_start + offset, nbytes)
            if data_start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name} ends past the end of the file")

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        self._pos = start + n
        if self._pos > len(self._map):
            raise ValueError("string runs past the end of the file")
        return self._map[start:self._pos].decode("utf-8", errors="replace")

    def _value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self._unpack("<" + _SCALARS[type_id])[0]
        if type_id == _STRING:
            return self._string()
        if type_id != _ARRAY:
            raise ValueError(f"unknown metadata value type {type_id}")
        item_type, n = self._unpack("<IQ")
        if item_type in _SCALARS:  # numeric arrays (token types, scores) in one read
            dtype = np.dtype("<" + _SCALARS[item_type])
            values = np.frombuffer(self._map, dtype, count=n, offset=self._pos).tolist()
            self._pos += n * dtype.itemsize
            return values
        return [self._value(item_type) for _ in range(n)]

    def read(self, t: GGUFTensor) -> Tensor:
        """The raw bytes of one tensor (uint8), read from the file into fresh memory."""
        raw = torch.empty(t.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            if f.readinto(raw.numpy()) != t.nbytes:
                raise WeightsError(f"{self.path}: unreadable GGUF file (truncated or corrupted?): "
                                   f"tensor {t.name} is cut short")
        return raw


def field(reader: GGUFFile, key: str, default=None):
    return reader.metadata.get(key, default)


def _dequantize_blocks(b: Tensor, kind: str, out: Tensor) -> None:
    """Blocks (rows, n_blocks, block_bytes) uint8 -> out (rows, n_blocks, 32) fp32, written in place."""
    scale = b[..., :2].contiguous().view(torch.float16).float()  # (rows, n_blocks, 1)
    if kind == "Q8_0":
        out.copy_(b[..., 2:].view(torch.int8)).mul_(scale)
        return
    qs = b[..., 2:] if kind == "Q4_0" else b[..., 4:]  # 16 bytes: low nibbles are weights 0..15, high 16..31
    out[..., :16].copy_(qs & 0x0F)
    out[..., 16:].copy_(qs >> 4)
    if kind == "Q4_0":
        out.sub_(8).mul_(scale)
    else:  # Q4_1: scale * q + min
        out.mul_(scale).add_(b[..., 2:4].contiguous().view(torch.float16).float())


def dequantize(raw: Tensor, kind: str, rows: int) -> Tensor:
    """Raw GGUF block bytes (uint8) of a (rows, cols) tensor -> fp32 weights, a slice of rows at a time."""
    b = raw.reshape(rows, -1, BLOCK_BYTES[kind])  # (rows, n_blocks, block_bytes)
    out = torch.empty(rows, b.shape[1], 32)
    step = max(1, _CHUNK_ELEMENTS // (b.shape[1] * 32))
    for r in range(0, rows, step):
        _dequantize_blocks(b[r:r + step], kind, out[r:r + step])
    return out.reshape(rows, -1)


def read_tensor(reader: GGUFFile, t: GGUFTensor) -> Tensor:
    """One tensor, dequantized to fp32 if it is block-quantized (F16/BF16 stay as they are)."""
    if t.kind in _FLOAT_DTYPES:
        return reader.read(t).view(_FLOAT_DTYPES[t.kind]).reshape(t.shape)
    if t.kind in BLOCK_BYTES:
        return dequantize(reader.read(t), t.kind, t.shape[0] if len(t.shape) > 1 else 1).reshape(t.shape)
    raise WeightsError(f"{reader.path}: tensor {t.name} has type {t.kind}; "
                       f"supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")


def open_reader(path: Path) -> GGUFFile:
    return GGUFFile(path)


def _rope_scaling_from_factors(factors: Tensor, args: ModelArgs, source: str) -> RopeScaling:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors (rope_freqs); recover the parameters."""
    from ..model import rope_frequencies
    plain = rope_frequencies(args)
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        scaling = RopeScaling(factor=factor, original_max_seq_len=8192)
        scaled = rope_frequencies(ModelArgs(**{**args.to_dict(), "rope_scaling": scaling}))
        if torch.allclose(plain / scaled, factors.float(), rtol=1e-3):
            return scaling
    raise WeightsError(f"{source}: rope_freqs does not match Llama 3.1 RoPE scaling with a standard factor")


def read_args(reader: GGUFFile) -> ModelArgs:
    """ModelArgs from the metadata (RoPE scaling, stored as a tensor, is filled in by the caller)."""
    source = str(reader.path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"{source}: architecture {arch!r} is not supported (only 'llama')")
    tensors = reader.tensors

    def req(key):
        v = field(reader, f"llama.{key}")
        if v is None:
            raise WeightsError(f"{source}: missing metadata llama.{key}")
        return v

    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{source}: missing tensor token_embd.weight")
    vocab = field(reader, "llama.vocab_size") or tensors["token_embd.weight"].shape[0]
    n_heads = int(req("attention.head_count"))
    args = ModelArgs(
        dim=int(req("embedding_length")), n_layers=int(req("block_count")), n_heads=n_heads,
        n_kv_heads=int(field(reader, "llama.attention.head_count_kv", n_heads)), vocab_size=int(vocab),
        hidden_dim=int(req("feed_forward_length")),
        norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_len=int(field(reader, "llama.context_length", 8192)),
        tie_embeddings="output.weight" not in tensors,
    )
    if int(field(reader, "llama.rope.dimension_count", args.head_dim)) != args.head_dim:
        raise WeightsError(f"{source}: partial RoPE (rope.dimension_count != head_dim) is not supported")
    return args


def read_gguf(path: Path, quantize: str | None = None, group_size: int = 32) -> Checkpoint:
    """Tensors one at a time: dequantized to fp32, or with `quantize` converted straight to llama3's quantized form
    (4-bit blocks repacked as they are), so the fp32 model never exists in memory."""
    reader = open_reader(path)
    source = str(path)
    args = read_args(reader)
    for name in reader.tensors:
        if name != "rope_freqs.weight" and meta_name(name) is None:
            raise WeightsError(f"{source}: unexpected tensor {name!r}")
    if "rope_freqs.weight" in reader.tensors:
        factors = read_tensor(reader, reader.tensors["rope_freqs.weight"])
        args.rope_scaling = _rope_scaling_from_factors(factors, args, source)
    metadata = {"file_type": field(reader, "general.file_type")}
    state_dict = {}
    if quantize:
        from ..quantize import quantize_gguf
        for _, tensors in quantize_gguf(reader, quantize, group_size):
            state_dict.update(tensors)
        metadata["quantization"] = {"scheme": quantize, "group_size": group_size}
    else:
        for name, t in reader.tensors.items():
            if name != "rope_freqs.weight":
                state_dict[meta_name(name)] = read_tensor(reader, t)
    tokenizer, template = None, field(reader, "tokenizer.chat_template")
    model = field(reader, "tokenizer.ggml.model")
    if model == "gpt2":
        from ..tokenizer import BPETokenizer
        tokenizer = BPETokenizer.from_gguf(reader)
    elif model is not None:
        raise WeightsError(f"{source}: tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    return Checkpoint(args, state_dict, tokenizer, template, format="gguf", metadata=metadata)
