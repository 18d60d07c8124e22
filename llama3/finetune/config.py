"""Fine-tuning configuration: the training loop's sections (run, training, optim, parallel, eval, checkpoint, faults,
metrics) plus model, method, data, lora, quant, dpo and export, read from a file and `section.key=value` overrides
like `llama3 train`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..hub import DEFAULT_MODEL
from ..train.config import (
    ConfigError,
    EvalConfig,
    LoopConfig,
    OptimConfig,
    TrainingConfig,
    apply_dict,
    apply_overrides,
    read_config_file,
    set_key,
    validate_loop,
)
from .data import LabelStrategy
from .lora import LoRAConfig
from .qlora import QuantKind

Method = Literal["full", "lora", "qlora"]
# Full fine-tuning moves every weight and wants a small step; adapters start at zero and need a larger one.
DEFAULT_LR = {"full": 2e-5, "lora": 1e-3, "qlora": 1e-3}


@dataclass
class DataConfig:
    path: str = ""  # JSONL file, or a bundled sample: pirate (chat), pirate_preferences (DPO)
    labels: LabelStrategy = "assistant"  # learn every assistant reply, only the last one, or all tokens
    seq_len: int = 512  # longest example (longer ones are truncated); with packing, the row length
    packing: bool = False  # concatenate short examples into rows of seq_len, attention kept inside each example
    val_fraction: float = 0.1  # examples held out for validation (ignored when val_path is given)
    val_path: str | None = None  # a separate validation file
    on_error: Literal["skip", "raise"] = "skip"  # a malformed record is reported and skipped, or stops the run


@dataclass
class QuantConfig:
    kind: QuantKind = "nf4"  # the 4-bit code of QLoRA's frozen base
    block_size: int = 64  # weights per scale


@dataclass
class DPOConfig:
    enabled: bool = False  # train on preference pairs (prompt, chosen, rejected) with DPO
    beta: float = 0.1  # how far the policy may move from the reference: larger keeps it closer


@dataclass
class ExportConfig:
    merged: Literal["none", "hf", "meta"] = "none"  # LoRA: also write the base with the adapter merged in


@dataclass
class FinetuneConfig(LoopConfig):
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(steps=100, batch_size=8, log_every=10))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=DEFAULT_LR["lora"], warmup_steps=10,
                                                                   weight_decay=0.0, min_lr_ratio=0.0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=50, steps=50, at_start=True))
    model: str = DEFAULT_MODEL  # known model name, .gguf file, or Meta / HF checkpoint directory
    method: Method = "lora"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None, **settings
                         ) -> FinetuneConfig:
    """Defaults, then the file, then `settings` (the command's own flags, keys like "data.path"), then the
    `section.key=value` overrides. The learning rate's default depends on the method, so the method is settled
    first and the defaults are chosen for it."""
    def build(method: str) -> FinetuneConfig:
        cfg = FinetuneConfig(method=method)
        cfg.optim.lr = DEFAULT_LR[method]
        # A LoRA checkpoint is the adapters and their optimizer state (megabytes); a full one is three times the
        # model, so full fine-tuning writes checkpoints only when asked.
        cfg.checkpoint.enabled = method != "full"
        if path is not None:
            apply_dict(cfg, read_config_file(Path(path)), source=str(path))
        for key, value in settings.items():
            if value is not None:
                set_key(cfg, key, value, source="command line")
        apply_overrides(cfg, overrides or [])
        return cfg

    cfg = build(build("lora").method)
    validate(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    validate_loop(cfg)
    d, p = cfg.data, cfg.parallel
    for key, value, least in (("training.steps", cfg.training.steps, 1), ("data.seq_len", d.seq_len, 8),
                              ("quant.block_size", cfg.quant.block_size, 2)):
        if value < least:
            raise ConfigError(f"{key} must be at least {least}; got {value}")
    if cfg.dpo.enabled and cfg.method == "full":
        raise ConfigError("DPO needs method lora or qlora: its reference model is the base with the adapters "
                          "turned off, so no second copy of the weights is kept")
    if cfg.dpo.enabled and p.pp > 1:
        raise ConfigError("DPO does not run pipelined: a pair's loss compares both replies' log-probabilities "
                          "under the policy with those under the reference (a second, adapter-free pass through "
                          "every stage), while a pipeline schedule computes each micro-batch's loss from one pass "
                          "on its last stage; use parallel.tp and data parallelism")
    if cfg.method == "qlora" and p.tp > 1:
        raise ConfigError("QLoRA's 4-bit base is not tensor parallel (its codes are packed in blocks of whole "
                          "rows of weights); use method lora with parallel.tp, or data parallelism")
    if cfg.dpo.enabled and (cfg.data.packing or cfg.data.labels != "assistant"):
        raise ConfigError("data.packing and data.labels are for SFT; DPO scores each pair's final reply, unpacked")
    if cfg.export.merged != "none" and cfg.method == "full":
        raise ConfigError("export.merged is for adapters; full fine-tuning already writes the whole model")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be positive; got {cfg.dpo.beta}")
    if cfg.quant.block_size % 2:
        raise ConfigError(f"quant.block_size must be even; got {cfg.quant.block_size}")
    try:
        cfg.lora.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
