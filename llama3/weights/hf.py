"""Hugging Face layout: config.json + model.safetensors (or shards with model.safetensors.index.json).

HF's Llama applies RoPE to the two halves of each head (`rotate_half`) while Meta rotates interleaved pairs, so HF
checkpoints carry wq and wk with the rows of each head permuted. `permute_to_hf` / `permute_from_hf` is the one
converter between the two; everything else is renaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from . import Checkpoint, WeightsError, read_tokenizer

_LAYER_NAMES = {  # Meta name inside layers.N -> HF name inside model.layers.N
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def permute_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta (interleaved pairs) -> HF (halves) row order of a q or k projection."""
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def permute_from_hf(w: Tensor, n_heads: int) -> Tensor:
    """HF (halves) -> Meta (interleaved pairs): the inverse of permute_to_hf."""
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_name(meta_name: str) -> str:
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"model.layers.{i}.{_LAYER_NAMES[rest]}"


def meta_name(name: str) -> str | None:
    for meta, hf in _TOP_NAMES.items():
        if name == hf:
            return meta
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        for meta, hf in _LAYER_NAMES.items():
            if rest == hf:
                return f"layers.{i}.{meta}"
    return None


def args_from_config(cfg: dict, source: str) -> ModelArgs:
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise WeightsError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
        scaling = None
        rs = cfg.get("rope_scaling")
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "llama3":
                raise WeightsError(f"{source}: unsupported rope_scaling type {kind!r} (only 'llama3')")
            scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                                  high_freq_factor=float(rs["high_freq_factor"]),
                                  original_max_seq_len=int(rs["original_max_position_embeddings"]))
        return ModelArgs(
            dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise WeightsError(f"{source}: missing key {e.args[0]!r}") from None


def config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "intermediate_size": args.ffn_hidden_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "head_dim": args.head_dim,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rope_scaling": None,
    }
    if args.rope_scaling is not None:
        s = args.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_seq_len}
    return cfg


def _read_safetensors(files: list[Path]) -> dict[str, Tensor]:
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    tensors[name] = st.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{f}: unreadable safetensors file (truncated or corrupted?): {e}") from None
    return tensors


def read_hf(path: Path) -> Checkpoint:
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("model_type", "llama") != "llama":
        raise WeightsError(f"{cfg_file}: model_type {cfg['model_type']!r} is not a Llama")
    args = args_from_config(cfg, str(cfg_file))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    state_dict = {}
    for name, t in _read_safetensors(files).items():
        m = meta_name(name)
        if m is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise WeightsError(f"{path}: unexpected tensor {name!r}")
        if m.endswith("attention.wq.weight"):
            t = permute_from_hf(t, args.n_heads)
        elif m.endswith("attention.wk.weight"):
            t = permute_from_hf(t, args.n_kv_heads)
        state_dict[m] = t
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)
    tokenizer, template = read_tokenizer(path)
    return Checkpoint(args, state_dict, tokenizer, template, format="hf")


def write_hf(path: Path, args: ModelArgs, state_dict: dict[str, Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in state_dict.items():
        if args.tie_embeddings and name == "output.weight":
            continue
        if name.endswith("attention.wq.weight"):
            t = permute_to_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_to_hf(t, args.n_kv_heads)
        out[hf_name(name)] = t.contiguous()
    dtype = next(iter(out.values())).dtype
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_from_args(args, dtype), indent=2))
