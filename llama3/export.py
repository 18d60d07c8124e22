"""Write a model (weights + tokenizer + chat template) in Hugging Face or Meta layout; `llama3.load` reads both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from .args import ModelArgs
from .hub import resolve
from .weights import Checkpoint, read_checkpoint
from .weights.hf import write_hf
from .weights.meta import write_meta


def save_tokenizer(tokenizer, chat_template: str | None, path: Path, layout: str) -> None:
    """Llama 3's tiktoken file goes where each layout keeps it; a byte-level BPE tokenizer as tokenizer.json."""
    model_file = getattr(tokenizer, "model_path", None)
    if model_file is not None:
        target = path / "tokenizer.model" if layout == "meta" else path / "original" / "tokenizer.model"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, target)
        if chat_template is not None:
            (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}, indent=2))
    elif tokenizer is not None:
        data, config = tokenizer.to_tokenizer_json()
        config["chat_template"] = chat_template
        (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def save_checkpoint(path: Path, args: ModelArgs, state_dict: dict[str, Tensor], *, layout: str = "hf",
                    tokenizer=None, chat_template: str | None = None, shards: int = 1) -> None:
    if layout == "hf":
        write_hf(path, args, state_dict, bos_id=getattr(tokenizer, "bos_id", None),
                 stop_ids=getattr(tokenizer, "stop_ids", ()))
    elif layout == "meta":
        write_meta(path, args, state_dict, n_shards=shards)
    else:
        raise ValueError(f"unknown layout {layout!r}: use 'hf' or 'meta'")
    save_tokenizer(tokenizer, chat_template, path, layout)


def export(src, dst: Path, *, to: str, shards: int = 1, dtype: str | torch.dtype | None = None) -> Checkpoint:
    ckpt = read_checkpoint(resolve(src))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    state = {k: v.to(dtype) if dtype is not None else v for k, v in ckpt.state_dict.items()}
    save_checkpoint(dst, ckpt.args, state, layout=to, tokenizer=ckpt.tokenizer, chat_template=ckpt.chat_template,
                    shards=shards)
    return ckpt
