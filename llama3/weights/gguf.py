"""GGUF files (llama.cpp) of architecture `llama`: metadata -> ModelArgs, tensors dequantized with vectorized torch.

llama.cpp's converter already undoes HF's q/k permutation, so GGUF q/k rows are in Meta's interleaved order.
Block formats (ggml-common.h): Q8_0 = fp16 scale + 32 int8; Q4_0 = fp16 scale + 32 4-bit values (offset 8);
Q4_1 = fp16 scale + fp16 min + 32 4-bit values. Low nibbles are elements 0..15 of a block, high nibbles 16..31.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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


def meta_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _as_tensor(array: np.ndarray) -> Tensor:
    with warnings.catch_warnings():  # the reader's memmap is read-only; we never write through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _blocks(raw: Tensor, rows: int, block_bytes: int) -> Tensor:
    return raw.reshape(rows, -1, block_bytes)  # (rows, n_blocks, block_bytes)


def _f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()  # (rows, n_blocks, 1)


def _nibbles(qs: Tensor) -> Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (rows, n_blocks, 32) values 0..15


def dequantize(raw: Tensor, kind: str, rows: int) -> Tensor:
    """Raw GGUF block bytes (uint8) of a (rows, cols) tensor -> fp32 weights."""
    b = _blocks(raw, rows, BLOCK_BYTES[kind])
    if kind == "Q8_0":
        w = _f16(b[..., :2]) * b[..., 2:].contiguous().view(torch.int8).float()
    elif kind == "Q4_0":
        w = _f16(b[..., :2]) * (_nibbles(b[..., 2:]).float() - 8)
    else:  # Q4_1
        w = _f16(b[..., :2]) * _nibbles(b[..., 4:]).float() + _f16(b[..., 2:4])
    return w.reshape(rows, -1)


def read_tensor(t, source: str) -> Tensor:
    kind = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
    data = _as_tensor(t.data)
    if kind == "F32":
        return data.view(torch.float32).reshape(shape)
    if kind == "F16":
        return data.view(torch.float16).reshape(shape)
    if kind == "BF16":
        return data.view(torch.uint8).view(torch.bfloat16).reshape(shape) if data.dtype == torch.uint8 \
            else data.view(torch.bfloat16).reshape(shape)
    if kind in BLOCK_BYTES:
        return dequantize(data.view(torch.uint8), kind, shape[0] if len(shape) > 1 else 1).reshape(shape)
    raise WeightsError(f"{source}: tensor {t.name} has type {kind}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")


def open_reader(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises assorted errors on truncated or malformed files
        raise WeightsError(f"{path}: unreadable GGUF file (truncated or corrupted?): {e}") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


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


def read_gguf(path: Path) -> Checkpoint:
    reader = open_reader(path)
    source = str(path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"{source}: architecture {arch!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}

    def req(key):
        v = field(reader, f"llama.{key}")
        if v is None:
            raise WeightsError(f"{source}: missing metadata llama.{key}")
        return v

    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{source}: missing tensor token_embd.weight")
    vocab = field(reader, "llama.vocab_size") or int(tensors["token_embd.weight"].shape[-1])
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
    state_dict = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            args.rope_scaling = _rope_scaling_from_factors(read_tensor(t, source), args, source)
            continue
        m = meta_name(name)
        if m is None:
            raise WeightsError(f"{source}: unexpected tensor {name!r}")
        state_dict[m] = read_tensor(t, source)
    tokenizer, template = None, field(reader, "tokenizer.chat_template")
    model = field(reader, "tokenizer.ggml.model")
    if model == "gpt2":
        from ..tokenizer import BPETokenizer
        tokenizer = BPETokenizer.from_gguf(reader)
    elif model is not None:
        raise WeightsError(f"{source}: tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    return Checkpoint(args, state_dict, tokenizer, template, format="gguf",
                      metadata={"file_type": field(reader, "general.file_type")})
