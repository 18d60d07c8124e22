"""Checkpoint formats. Each reader returns a `Checkpoint`: ModelArgs + a state dict in Meta's parameter names +
the tokenizer that came with the weights. Writers take the same pieces back out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..args import ModelArgs


class WeightsError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it."""


@dataclass
class Checkpoint:
    args: ModelArgs
    state_dict: dict[str, Tensor]
    tokenizer: Any = None
    chat_template: str | None = None
    format: str = ""
    metadata: dict = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """'gguf', 'meta' (params.json + consolidated.*.pth), 'hf' (config.json + *.safetensors) or 'quantized'
    (llama3's own quantized checkpoint: quantization.json + model.safetensors)."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise WeightsError(f"{p}: not a GGUF file (magic {magic!r}); pass a .gguf file or a checkpoint directory")
    if (p / "quantization.json").exists():
        return "quantized"
    if (p / "params.json").exists() and any(p.glob("consolidated.*.pth")):
        return "meta"
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise WeightsError(f"{p}: not a checkpoint directory (expected params.json + consolidated.NN.pth, "
                       f"config.json + *.safetensors, or one .gguf file)")


def read_checkpoint(path: str | Path, blocks: bool = False) -> Checkpoint:
    """Read any supported checkpoint: ModelArgs, tensors in Meta's names, the tokenizer. GGUF block-quantized
    tensors come back dequantized to fp32, or with `blocks` as `gguf.GGUFTensor` handles on their raw blocks (for
    a quantizer to repack); llama3's quantized directories hold portable quantized tensors (metadata
    "quantization" says which)."""
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "gguf":
        from .gguf import read_gguf
        return read_gguf(p if p.is_file() else sorted(p.glob("*.gguf"))[0], blocks)
    if fmt == "quantized":
        from .quantized import read_quantized
        return read_quantized(p)
    if fmt == "meta":
        from .meta import read_meta
        return read_meta(p)
    from .hf import read_hf
    return read_hf(p)


def read_tokenizer(path: Path):
    """The tokenizer stored in a checkpoint directory and its chat template (None for Llama 3's own format).

    Meta's tiktoken file (tokenizer.model, or original/tokenizer.model in HF repositories) is preferred: it is the
    exact Llama 3 tokenizer. Otherwise a byte-level BPE tokenizer.json; otherwise (None, None)."""
    import json
    template = None
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            template = json.loads(tok_cfg.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise WeightsError(f"{tok_cfg}: not valid JSON ({e})") from None
    for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if candidate.exists():
            from ..tokenizer import Tokenizer
            return Tokenizer(str(candidate)), None
    if (path / "tokenizer.json").exists():
        from ..tokenizer import BPETokenizer
        return BPETokenizer.from_tokenizer_json(path / "tokenizer.json"), template
    return None, template


def check_state_dict(state_dict: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Names and shapes must match the model exactly; say which ones do not."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{source}: tensors do not match the model: missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != tuple(shape):
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                               f"the model config needs {tuple(shape)}")
