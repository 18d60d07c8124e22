"""Meta's checkpoint layout: params.json + consolidated.NN.pth (one per model-parallel rank) + tokenizer.model."""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from .checkpoint import Checkpoint, WeightsError, read_tokenizer

# Model-parallel shards split these along dim 0 (column-parallel) or the last dim (row-parallel); the rest
# (the norms) are replicated on every rank.
_CONCAT_DIM0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
                "tok_embeddings.weight")
_CONCAT_LAST = ("wo.weight", "w2.weight")


def shard_dim(name: str) -> int | None:
    if name.endswith(_CONCAT_DIM0):
        return 0
    if name.endswith(_CONCAT_LAST):
        return -1
    return None


# params.json keys: Meta's own (llama-models' ModelArgs) and the three we add (rope_scaling, hidden_dim,
# tie_embeddings) when Meta's cannot express a model. Anything else (vision, MoE, quantization args) is an error.
_PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "max_batch_size",
                "rope_scaling", "hidden_dim", "tie_embeddings"}


def args_from_params(params: dict, source: str) -> ModelArgs:
    """ModelArgs from params.json; absent keys take the defaults of Meta's reference code."""
    unknown = sorted(set(params) - _PARAMS_KEYS)
    if unknown:
        raise WeightsError(f"{source}: key(s) {', '.join(unknown)} not understood (they may change the model's math)")
    try:
        scaled = params.get("use_scaled_rope", False)
        return ModelArgs(
            dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"], vocab_size=params["vocab_size"],
            multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 500000.0),
            rope_scaling=(RopeScaling(**params["rope_scaling"]) if "rope_scaling" in params
                          else RopeScaling(factor=params.get("rope_scaling_factor", 8.0)) if scaled else None),
            max_seq_len=params.get("max_seq_len", 131072 if scaled else 8192),
            tie_embeddings=params.get("tie_embeddings", False),
            hidden_dim=params.get("hidden_dim"),
        )
    except KeyError as e:
        raise WeightsError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: invalid model parameters: {e}") from None


def params_from_args(args: ModelArgs) -> dict:
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of,
                  ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                  use_scaled_rope=args.rope_scaling is not None)
    if args.rope_scaling is not None:
        params["rope_scaling_factor"] = args.rope_scaling.factor
        if args.rope_scaling != RopeScaling(factor=args.rope_scaling.factor):  # beyond what Meta's keys express
            params["rope_scaling"] = dataclasses.asdict(args.rope_scaling)
    if args.hidden_dim is not None:  # not Meta's own key; written only when the formula cannot reproduce it
        params["hidden_dim"] = args.hidden_dim
    if args.tie_embeddings:
        params["tie_embeddings"] = True
    params["max_seq_len"] = args.max_seq_len
    return params


def load_torch_file(path: Path) -> dict[str, Tensor]:
    """torch.load memory-mapped and without executing pickled code; bad files become one clear error."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: unreadable PyTorch checkpoint (truncated or corrupted?): {reason}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return sd


def merge_shards(shards: list[dict[str, Tensor]], source: str) -> dict[str, Tensor]:
    if len(shards) == 1:
        return shards[0]
    names = set(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != names:
            raise WeightsError(f"{source}: shard {i} holds different tensors than shard 0")
    merged = {}
    for name in shards[0]:
        dim = shard_dim(name)
        merged[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return merged


def read_meta(path: Path) -> Checkpoint:
    params_file = path / "params.json"
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{params_file}: not valid JSON ({e})") from None
    args = args_from_params(params, str(params_file))
    files = sorted(path.glob("consolidated.*.pth"))
    state_dict = merge_shards([load_torch_file(f) for f in files], str(path))
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rope.freqs")}  # old Meta files carry it
    if "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        args.tie_embeddings = True
    tokenizer, template = read_tokenizer(path)
    return Checkpoint(args, state_dict, tokenizer, template, format="meta")


def write_meta(path: Path, args: ModelArgs, state_dict: dict[str, Tensor], n_shards: int = 1,
               tokenizer_file: Path | None = None) -> None:
    """Write params.json + consolidated.NN.pth split into n_shards model-parallel shards, as Meta does."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params_from_args(args), indent=2))
    sd = {k: v for k, v in state_dict.items() if not (args.tie_embeddings and k == "output.weight")}
    for rank in range(n_shards):
        shard = {}
        for name, t in sd.items():
            dim = shard_dim(name)
            if dim is not None:
                if t.shape[dim] % n_shards:
                    raise WeightsError(f"{name} of shape {tuple(t.shape)} does not split into {n_shards} shards")
                t = t.chunk(n_shards, dim=dim)[rank]
            shard[name] = t.contiguous().clone()
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    if tokenizer_file is not None:
        (path / "tokenizer.model").write_bytes(Path(tokenizer_file).read_bytes())
