"""Instruct fine-tuning: supervised fine-tuning with prompt masking, LoRA, QLoRA and DPO (`llama3 finetune`).

This module stays light (the `llama3` command imports it for --help); the fine-tuning task lives in tasks.py, the
loop in llama3/train/trainer.py.
"""

from __future__ import annotations

from typing import Literal

from .lora import apply_adapter

__all__ = ["apply_adapter", "finetune"]


def finetune(overrides: list[str] | None = None, *, model: str | None = None, data: str | None = None,
             method: Literal["full", "lora", "qlora"] | None = None, dpo: bool = False, config: str | None = None,
             out: str | None = None):
    """Fine-tune a model on chat data (SFT) or preference pairs (DPO), fully or with LoRA / QLoRA adapters.
    With no arguments: LoRA on the bundled pirate chats, which the default model learns in minutes on a CPU.
    Then: llama3 chat --adapter RUN/adapter

    Args:
        model: known model name, .gguf file, or Meta / Hugging Face checkpoint directory (default: the default model)
        data: JSONL chats (messages, conversations, instruction/output, prompt/completion) or a bundled sample name
        method: full, lora, or qlora (LoRA over a 4-bit frozen base); default lora
        dpo: train on preference pairs (prompt, chosen, rejected) with DPO; needs lora or qlora
        config: TOML, JSON or YAML file with the fine-tuning configuration
        out: run directory for metrics, checkpoints and the adapter or model (default runs/finetune-...)
        overrides: section.key=value settings, e.g. training.steps=200 lora.rank=8 data.packing=true dpo.beta=0.2
    """
    from .config import load_finetune_config
    from .tasks import run
    settings = {"model": model, "method": method, "run.dir": out, "dpo.enabled": dpo or None, "data.path": data}
    cfg = load_finetune_config(config, overrides, **settings)
    if not cfg.data.path:  # the bundled samples
        cfg.data.path = "pirate_preferences" if cfg.dpo.enabled else "pirate"
    return run(cfg)
