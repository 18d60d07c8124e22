"""Hugging Face layout: config.json + model.safetensors (or shards with model.safetensors.index.json).

HF's Llama applies RoPE to the two halves of each head (`rotate_half`) while Meta rotates interleaved pairs, so HF
checkpoints carry wq and wk with the rows of each head permuted. `permute_to_hf` / `permute_from_hf` is the one
converter between the two; everything else is renaming.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from .checkpoint import Checkpoint, WeightsError, read_tokenizer

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


# Keys of a Llama config.json that do not change what the model computes (bookkeeping, generation defaults, token
# ids). Any key outside these and the ones `args_from_config` reads is an error: it may change the math.
_BOOKKEEPING_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params",
    "_attn_implementation_autoset", "max_length", "min_length", "do_sample", "temperature", "top_p", "top_k",
    "num_beams", "repetition_penalty", "early_stopping", "num_return_sequences", "chunk_size_feed_forward",
    "is_llama_config", "transformers.js_config",  # SmolLM2's
})
# Keys whose only supported value is the one Llama 3 uses.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
          "attention_dropout": 0.0, "rope_interleaved": False}
_ROPE_KEYS = {"default": {"rope_type", "rope_theta"},
              "llama3": {"rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}}


def _rope(cfg: dict, source: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either layout: transformers 5's `rope_parameters` or 4.x's top-level
    `rope_theta` / `rope_scaling`. Both present must agree. Absent keys take transformers' defaults (theta 10000,
    no scaling); an unknown rope type or key is an error."""
    legacy = dict(cfg.get("rope_scaling") or {})
    if "type" in legacy:  # the oldest spelling of rope_type
        legacy.setdefault("rope_type", legacy.pop("type"))
    if "rope_theta" in cfg:
        legacy["rope_theta"] = cfg["rope_theta"]
    new = cfg.get("rope_parameters")
    if new is not None and not isinstance(new, dict):
        raise WeightsError(f"{source}: rope_parameters must be an object, got {new!r}")
    rope = dict(new or legacy)
    if new and legacy:
        for key in set(rope) | set(legacy):
            left, right = rope.get(key), legacy.get(key)
            if left is not None and right is not None and left != right:
                raise WeightsError(f"{source}: rope_parameters {key}={left!r} disagrees with the top-level "
                                   f"rope_theta / rope_scaling ({right!r})")
            rope.setdefault(key, right)
    kind = rope.get("rope_type", "default")
    if kind not in _ROPE_KEYS:
        raise WeightsError(f"{source}: rope_type {kind!r} is not supported (only 'default' and 'llama3')")
    unknown = sorted(set(rope) - _ROPE_KEYS[kind])
    if unknown:
        raise WeightsError(f"{source}: RoPE key(s) {', '.join(unknown)} not understood for rope_type {kind!r}")
    theta = float(rope.get("rope_theta", 10000.0))
    if kind == "default":
        return theta, None
    try:
        return theta, RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                  high_freq_factor=float(rope["high_freq_factor"]),
                                  original_max_seq_len=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
        raise WeightsError(f"{source}: llama3 RoPE scaling needs {e.args[0]!r}") from None


def args_from_config(cfg: dict, source: str) -> ModelArgs:
    """ModelArgs from a Llama config.json of any transformers version, with transformers' own defaults for the keys
    it leaves out (LlamaConfig: rms_norm_eps 1e-6, 2048 positions, untied embeddings)."""
    read = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "intermediate_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "head_dim",
            "rope_theta", "rope_scaling", "rope_parameters"}
    unknown = sorted(set(cfg) - read - _BOOKKEEPING_KEYS - set(_FIXED))
    if unknown:
        raise WeightsError(f"{source}: config key(s) {', '.join(unknown)} not understood (they may change the "
                           f"model's math)")
    for key, value in _FIXED.items():
        if cfg.get(key, value) != value:
            raise WeightsError(f"{source}: {key}={cfg[key]!r} is not supported (Llama 3 uses {value!r})")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise WeightsError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
        theta, scaling = _rope(cfg, source)
        return ModelArgs(
            dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise WeightsError(f"{source}: missing key {e.args[0]!r}") from None


def config_from_args(args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None,
                     stop_ids: Iterable[int] = ()) -> dict:
    """config.json that transformers 4.x (top-level rope_theta / rope_scaling) and 5.x (rope_parameters) both read
    as this model; eos_token_id lists every id that ends a chat turn."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
        rope = {**scaling, "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "intermediate_size": args.ffn_hidden_dim, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "head_dim": args.head_dim,
        "rope_theta": args.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **_token_ids(bos_id, stop_ids),
    }


def generation_config(bos_id: int | None, stop_ids: Iterable[int]) -> dict:
    """generation_config.json: HF's generate stops at any of the stop ids (e.g. <|eot_id|>, not only eos)."""
    return _token_ids(bos_id, stop_ids)


def _token_ids(bos_id: int | None, stop_ids: Iterable[int]) -> dict:
    stops = sorted(stop_ids)
    ids = {} if bos_id is None else {"bos_token_id": bos_id}
    if stops:
        ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return ids


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


def write_hf(path: Path, args: ModelArgs, state_dict: dict[str, Tensor], *, bos_id: int | None = None,
             stop_ids: Iterable[int] = ()) -> None:
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
    (path / "config.json").write_text(json.dumps(config_from_args(args, dtype, bos_id, stop_ids), indent=2))
    if bos_id is not None or stop_ids:
        (path / "generation_config.json").write_text(json.dumps(generation_config(bos_id, stop_ids), indent=2))
