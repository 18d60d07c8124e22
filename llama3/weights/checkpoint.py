"""What every checkpoint reader returns, and the pieces the readers share."""

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
