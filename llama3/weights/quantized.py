"""llama3's quantized checkpoint: a directory written by `llama3 quantize`.

  quantization.json   {"format": "llama3-quantized", "version": 1, "scheme": "int8" | "int4", "group_size": 32,
                       "args": ModelArgs}
  model.safetensors   the portable quantized tensors in Meta's names (layout in llama3/quantize.py)
  tokenizer files     as in a Hugging Face directory (tokenizer.json or original/tokenizer.model, tokenizer_config.json)
"""

from __future__ import annotations

import json
from pathlib import Path

import struct

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..args import ModelArgs
from .checkpoint import Checkpoint, WeightsError, read_tokenizer

_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
CONFIG_NAME = "quantization.json"
FORMAT = "llama3-quantized"


def write_quantized(path: Path, args: ModelArgs, state_dict: dict[str, Tensor], *, scheme: str,
                    group_size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"),
              metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": 1, "scheme": scheme, "group_size": group_size, "args": args.to_dict()}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def read_quantized(path: Path) -> Checkpoint:
    cfg_file = path / CONFIG_NAME
    try:
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise WeightsError(f"{cfg_file}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
        args = ModelArgs.from_dict(cfg["args"])
        quantization = {"scheme": cfg["scheme"], "group_size": int(cfg["group_size"])}
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_file}: not valid JSON ({e})") from None
    except KeyError as e:
        raise WeightsError(f"{cfg_file}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{cfg_file}: invalid model arguments: {e}") from None
    state_dict = read_safetensors_copy(path / "model.safetensors")
    tokenizer, template = read_tokenizer(path)
    return Checkpoint(args, state_dict, tokenizer, template, format="quantized",
                      metadata={"quantization": quantization})


def read_safetensors_copy(path: Path) -> dict[str, Tensor]:
    """Every tensor read into its own fresh allocation. Not memory-mapped: torch's int8/int4 CPU kernels need
    aligned data (a tensor inside a mapped file can start anywhere), and copies let the file's pages go."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            tensors = {}
            for name, info in header.items():
                start, end = info["data_offsets"]
                t = torch.empty(end - start, dtype=torch.uint8)
                f.seek(8 + n + start)
                if f.readinto(t.numpy()) != end - start:
                    raise ValueError(f"tensor {name} is cut short")
                tensors[name] = t.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
            return tensors
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupted?): {e}") from None
