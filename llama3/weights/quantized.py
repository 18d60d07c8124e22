"""llama3's quantized checkpoint: a directory written by `llama3 quantize`.

  quantization.json   {"format": "llama3-quantized", "version": 1, "scheme": "int8" | "int4", "group_size": 32,
                       "args": ModelArgs}
  model.safetensors   the portable quantized tensors in Meta's names (layout in llama3/quantize.py)
  tokenizer files     as in a Hugging Face directory (tokenizer.json or original/tokenizer.model, tokenizer_config.json)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from ..args import ModelArgs
from . import Checkpoint, WeightsError, read_tokenizer

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
    weights = path / "model.safetensors"
    try:  # memory-mapped: a tensor is read when it is used (int8) or repacked (int4)
        with safe_open(str(weights), framework="pt") as st:
            state_dict = {name: st.get_tensor(name) for name in st.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{weights}: unreadable safetensors file (truncated or corrupted?): {e}") from None
    tokenizer, template = read_tokenizer(path)
    return Checkpoint(args, state_dict, tokenizer, template, format="quantized",
                      metadata={"quantization": quantization})
