"""GGUF files (llama.cpp) of architecture `llama`: metadata -> ModelArgs, tensors as the file stores them.

llama.cpp's converter already undoes HF's q/k permutation, so GGUF q/k rows are in Meta's interleaved order.
A tensor is either a float array (F32, F16, BF16: read as torch tensors) or block-quantized (Q8_0, Q4_K, IQ4_XS, ...:
kept as a `GGUFTensor`, a handle on its raw blocks that a reader dequantizes, or a quantizer repacks, one tensor at a
time). Dequantization is the `gguf` package's own (`gguf.quants.dequantize`, vectorized numpy), applied to slices
of rows so temporaries stay small: the values are exactly the package's, for every type it can dequantize.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from .checkpoint import Checkpoint, WeightsError

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # read as they are
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


def type_name(type_id: int) -> str:
    """A ggml tensor type by its name (Q6_K, IQ4_XS, ...), as llama.cpp and the gguf package spell it."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type id {type_id}"


@functools.cache
def can_dequantize(kind: str) -> bool:
    """Whether the installed gguf package dequantizes this type (probed on one zero block)."""
    if kind in _FLOAT_DTYPES:
        return True
    if kind not in GGMLQuantizationType.__members__:
        return False
    qtype = GGMLQuantizationType[kind]
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True


def supported_types() -> list[str]:
    return [t.name for t in GGMLQuantizationType if can_dequantize(t.name)]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are and how they are laid out; `raw()` reads them."""

    path: Path
    name: str
    kind: str  # the ggml type name: F32, F16, BF16, Q8_0, Q4_K, Q6_K, ...
    shape: tuple[int, ...]  # PyTorch order (GGUF lists dims fastest-first)
    offset: int  # absolute position of the data in the file
    nbytes: int

    @property
    def block(self) -> tuple[int, int]:
        """(weights per block, bytes per block) of this tensor's type."""
        return GGML_QUANT_SIZES[GGMLQuantizationType[self.kind]]

    def raw(self) -> Tensor:
        """The tensor's bytes (uint8, rows x bytes per row), read from the file into fresh memory."""
        raw = torch.empty(self.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(raw.numpy()) != self.nbytes:
                raise WeightsError(f"{self.path}: unreadable GGUF file (truncated or corrupted?): "
                                   f"tensor {self.name} is cut short")
        return raw.reshape(self.shape[0] if len(self.shape) > 1 else 1, -1)


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
            kind = type_name(type_id)
            numel = int(np.prod(shape)) if shape else 1
            nbytes = 0
            if kind in GGMLQuantizationType.__members__:
                block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
                if shape and shape[-1] % block_size:
                    raise ValueError(f"tensor {name} has rows of {shape[-1]} weights, not whole {kind} blocks")
                nbytes = numel // block_size * block_bytes
            self.tensors[name] = GGUFTensor(self.path, name, kind, shape, data_start + offset, nbytes)
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
        if item_type == _STRING:  # vocabularies and merges: hundreds of thousands of strings, in one tight loop
            return self._strings(n)
        return [self._value(item_type) for _ in range(n)]

    def _strings(self, n: int) -> list[str]:
        buf, pos, end, out = self._map, self._pos, len(self._map), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(n):
            (size,) = length(buf, pos)
            pos += 8 + size
            if pos > end:
                raise ValueError("string runs past the end of the file")
            out.append(buf[pos - size:pos].decode("utf-8", errors="replace"))
        self._pos = pos
        return out


def field(reader: GGUFFile, key: str, default=None):
    return reader.metadata.get(key, default)


_ROWS_ELEMENTS = 1 << 22  # dequantize ~4M weights at a time so the numpy temporaries stay ~100 MB at most


def dequantize(raw: Tensor, kind: str, rows: int) -> Tensor:
    """Raw GGUF blocks (uint8) of a (rows, cols) tensor -> fp32 (rows, cols), exactly as gguf.quants.dequantize
    computes them, a slice of rows at a time."""
    if not can_dequantize(kind):
        raise WeightsError(f"GGUF tensor type {kind} cannot be dequantized (supported: {', '.join(supported_types())})")
    raw = raw.reshape(rows, -1).numpy()
    if kind in _FLOAT_DTYPES:
        return torch.from_numpy(raw.copy()).view(_FLOAT_DTYPES[kind]).float()
    qtype = GGMLQuantizationType[kind]
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = raw.shape[1] // block_bytes * block_size
    step = max(1, _ROWS_ELEMENTS // max(cols, 1))
    if rows <= step:
        return torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    out = torch.empty(rows, cols)
    for r in range(0, rows, step):
        out[r:r + step] = torch.from_numpy(gguf.quants.dequantize(raw[r:r + step], qtype))
    return out


def read_tensor(t: GGUFTensor) -> Tensor:
    """One tensor as floats: F32/F16/BF16 as stored, block-quantized types dequantized to fp32."""
    raw = t.raw()
    if t.kind in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[t.kind]).reshape(t.shape)
    return dequantize(raw, t.kind, raw.shape[0]).reshape(t.shape)


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


# Every `llama.*` key we know. Any other one may change the math (experts, RoPE scaling, soft-capping ...): an error.
_LLAMA_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
    "vocab_size", "attention.key_length", "attention.value_length", "rope.scaling.type", "rope.scaling.factor",
    "expert_count", "expert_used_count",
}


def read_args(reader: GGUFFile) -> ModelArgs:
    """ModelArgs from the metadata, read as llama.cpp reads it (its defaults where a key is optional there; a
    missing required key or one we do not know is an error). RoPE scaling, stored as a tensor, is filled in by
    the caller."""
    source = str(reader.path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"{source}: architecture {arch!r} is not supported (only 'llama')")
    unknown = sorted(k for k in reader.metadata if k.startswith("llama.") and k[6:] not in _LLAMA_KEYS)
    if unknown:
        raise WeightsError(f"{source}: metadata {', '.join(unknown)} not understood (it may change the model's math)")
    tensors = reader.tensors

    def req(key):
        v = field(reader, f"llama.{key}")
        if v is None:
            raise WeightsError(f"{source}: missing metadata llama.{key}")
        return v

    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{source}: missing tensor token_embd.weight")
    if field(reader, "llama.expert_count", 0):
        raise WeightsError(f"{source}: mixture-of-experts models (llama.expert_count) are not supported")
    scaling = field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or float(field(reader, "llama.rope.scaling.factor", 1.0)) != 1.0:
        raise WeightsError(f"{source}: RoPE scaling {scaling!r} (llama.rope.scaling.*) is not supported; Llama 3.1 "
                           f"scaling is read from the rope_freqs tensor")
    vocab = field(reader, "llama.vocab_size") or tensors["token_embd.weight"].shape[0]
    n_heads = int(req("attention.head_count"))
    args = ModelArgs(
        dim=int(req("embedding_length")), n_layers=int(req("block_count")), n_heads=n_heads,
        n_kv_heads=int(field(reader, "llama.attention.head_count_kv", n_heads)), vocab_size=int(vocab),
        hidden_dim=int(req("feed_forward_length")), norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),  # llama.cpp's default
        max_seq_len=int(req("context_length")), tie_embeddings="output.weight" not in tensors,
    )
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if int(field(reader, f"llama.{key}", args.head_dim)) != args.head_dim:
            raise WeightsError(f"{source}: llama.{key} != head_dim {args.head_dim} is not supported")
    return args


def read_gguf(path: Path, blocks: bool = False) -> Checkpoint:
    """The checkpoint, tensor by tensor in Meta's names. Block-quantized tensors are dequantized to fp32, or with
    `blocks` left as `GGUFTensor` handles for a quantizer to take as they are (nothing read yet)."""
    reader = GGUFFile(path)
    source = str(path)
    args = read_args(reader)
    for name, t in reader.tensors.items():
        if name != "rope_freqs.weight" and meta_name(name) is None:
            raise WeightsError(f"{source}: unexpected tensor {name!r}")
        if not can_dequantize(t.kind):
            raise WeightsError(f"{source}: tensor {name} has type {t.kind}, which cannot be read; "
                               f"supported: {', '.join(supported_types())}")
    if "rope_freqs.weight" in reader.tensors:
        factors = read_tensor(reader.tensors["rope_freqs.weight"])
        args.rope_scaling = _rope_scaling_from_factors(factors, args, source)
    state_dict = {}
    for name, t in reader.tensors.items():
        if name != "rope_freqs.weight":
            keep = blocks and t.kind not in _FLOAT_DTYPES
            state_dict[meta_name(name)] = t if keep else read_tensor(t)
    tokenizer, template = None, field(reader, "tokenizer.chat_template")
    model = field(reader, "tokenizer.ggml.model")
    if model == "gpt2":
        from ..tokenizer import BPETokenizer
        tokenizer = BPETokenizer.from_gguf(reader)
    elif model is not None:
        raise WeightsError(f"{source}: tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    return Checkpoint(args, state_dict, tokenizer, template, format="gguf",
                      metadata={"file_type": field(reader, "general.file_type")})
