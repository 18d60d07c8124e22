"""Checkpoint formats. Each reader returns a `Checkpoint`: ModelArgs + a state dict in Meta's parameter names +
the tokenizer that came with the weights. Writers take the same pieces back out. Formats know nothing of
quantization or of the model: quantization (llama3/quantize.py) stands above them, and so do model building and
`llama3.load` (llama3/llama.py)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint, WeightsError, check_state_dict, read_tokenizer

__all__ = ["Checkpoint", "WeightsError", "check_state_dict", "read_tokenizer", "detect_format", "read_checkpoint"]


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
