"""Fine-tuning as a task of the training loop (llama3/train/trainer.py): supervised fine-tuning (SFT) with prompt
masking, or DPO on preference pairs; every weight (full), low-rank adapters (LoRA) or adapters over a 4-bit base
(QLoRA). What is ours here is only what differs from pretraining: the loaded model and its transform, chat rows
with label masks or preference pairs, the objective, the FLOP count and the export. Everything else (layouts,
checkpoints, the loss guard, watchdog, fingerprints, fault injection, goodput, metrics) is the loop's.

    llama3 finetune --data chats.jsonl --method qlora training.steps=200
    torchrun --nproc-per-node 2 -m llama3.finetune --data chats.jsonl parallel.tp=2
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from ..llama import Llama, load
from ..train.checkpoint import is_rank0
from ..train.config import Layout
from ..train.metrics import flops_per_token, matmul_params, tensor_gib
from ..train.trainer import Batch, NextTokenLoss, Trainer
from .config import FinetuneConfig
from .data import Batches, as_row, collate, fixed_batches, load_preferences, load_sft, pack, split_validation
from .dpo import DPOLoss
from .lora import add_lora, adapter_state_dict, merge_adapter, save_adapter
from .samples import SAMPLES


class Finetuning:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.dpo = cfg.dpo.enabled
        self.objective = DPOLoss(cfg.dpo.beta) if self.dpo else NextTokenLoss()
        self.document_masking = cfg.data.packing  # packed examples stay apart

    def default_run_dir(self) -> str:
        return f"runs/finetune-{'dpo' if self.dpo else 'sft'}-{self.cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"

    def build_model(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The base on the CPU, then adapters (LoRA), or 4-bit layers quantized one by one on the device (QLoRA),
        then the model on the device. Full fine-tuning keeps fp32 master weights; adapters train over a base
        stored in the compute dtype."""
        cfg = self.cfg
        self.llm = llm = load(cfg.model, dtype=torch.float32 if cfg.method == "full" else dtype)
        self.args, self.tokenizer, self.chat_format = llm.args, llm.tokenizer, llm.chat_format
        model = llm.model
        if cfg.method == "full":
            model.requires_grad_(True)
        else:
            torch.manual_seed(cfg.run.seed)  # the adapters' random init: the same on every rank and every run
            quant = cfg.quant.kind if cfg.method == "qlora" else None
            add_lora(model, cfg.lora, quant=quant, block_size=cfg.quant.block_size, device=device)
        if cfg.method != "lora":
            # Loaded weights may be views of the memory-mapped checkpoint (read-only for GGUF). Full fine-tuning
            # writes to them; QLoRA has read every page to quantize and would keep them all resident. Owning
            # copies (for QLoRA only the embeddings and norms are left) let the file go.
            for p in model.parameters():
                p.data = p.data.clone()
        self.objective.policy = model
        self.trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.model_gib = tensor_gib(model)
        return model.to(device).train()

    def build_data(self, layout: Layout, dp_rank: int) -> None:
        """SFT rows are examples (packed or not); DPO rows are pairs."""
        d, seed = self.cfg.data, self.cfg.run.seed
        load_items = load_preferences if self.dpo else load_sft
        kwargs = {"max_len": d.seq_len + 1, "on_error": d.on_error, "log": sys.stderr if is_rank0() else None}
        if not self.dpo:
            kwargs["strategy"] = d.labels
        items, report = load_items(SAMPLES.get(d.path, d.path), self.chat_format, **kwargs)
        summary = [report.summary()]
        if d.val_path:
            train, (val, val_report) = items, load_items(SAMPLES.get(d.val_path, d.val_path), self.chat_format,
                                                         **kwargs)
            summary.append(val_report.summary())
        else:
            train, val = split_validation(items, d.val_fraction, seed)
        if not self.dpo:
            train = pack(train, d.seq_len + 1) if d.packing else [as_row(e) for e in train]
            val = [as_row(e) for e in val]
        self.train_data = Batches(train, layout.micro_batch_size, rank=dp_rank, world_size=layout.dp, seed=seed)
        self.val_rows, self.layout, self.dp_rank = val, layout, dp_rank
        # Sequence parallelism splits T over the TP ranks and a pipeline fixes its shapes at the first step: both
        # want every batch of one shape. Otherwise rows are padded to the longest (packed rows are full anyway).
        fixed = layout.tp > 1 or layout.pp > 1
        self.length = d.seq_len + 1 if fixed or d.packing else None
        self.n_rows = layout.micro_batch_size if fixed else None
        summary.append(f"{len(train)} training rows, {len(val)} validation")
        self.data_summary = "; ".join(summary)

    def val_batches(self):
        """Every layout scores the same rows: the first eval.steps global batches of the validation rows."""
        if not self.val_rows:
            return iter(())
        batches = fixed_batches(self.val_rows, self.layout.micro_batch_size, rank=self.dp_rank,
                                world_size=self.layout.dp)
        return (b for _, b in zip(range(self.cfg.eval.steps * self.layout.grad_accum), batches))

    def collate(self, rows) -> Batch:
        if not self.dpo:
            inputs, targets, positions = collate(rows, self.tokenizer.pad_id, self.length, self.n_rows)
            return Batch(inputs, targets, positions, sum(len(r.tokens) - 1 for r in rows))
        # The chosen rows, then the rejected rows of the same pairs, each half padded alike.
        halves = [[as_row(p.chosen) for p in rows], [as_row(p.rejected) for p in rows]]
        length = self.length or max(len(r.tokens) for half in halves for r in half)
        inputs, targets, positions = (torch.cat(t) for t in zip(*(
            collate(half, self.tokenizer.pad_id, length, self.n_rows) for half in halves)))
        return Batch(inputs, targets, positions, sum(len(r.tokens) - 1 for half in halves for r in half))

    def flops_per_token(self, seq_len: float) -> float:
        """A frozen base computes no weight gradients (metrics.flops_per_token); DPO adds the reference's forward."""
        trained = None if self.cfg.method == "full" else self.trained_params
        flops = flops_per_token(self.args, seq_len, trained_params=trained)
        if self.dpo:
            flops += 2 * matmul_params(self.args) + 4 * self.args.n_layers * self.args.dim * seq_len / 2
        return flops

    def describe(self, trainer: Trainer) -> str:
        quant = f" ({self.cfg.quant.kind} base)" if self.cfg.method == "qlora" else ""
        return (f"{'DPO' if self.dpo else 'SFT'} {self.cfg.method}{quant} of {self.cfg.model}: "
                f"{self.trained_params / 1e6:.2f}M trained parameters, model tensors {self.model_gib:.2f} GiB; "
                f"{self.data_summary}")

    def export(self, trainer: Trainer) -> Path | None:
        """Adapters to <run>/adapter (and a merged model if asked); a full fine-tune to <run>/model, in the
        layout that `llama3.load` and `llama3 chat` read."""
        from ..export import save_checkpoint
        cfg = self.cfg
        state = trainer.full_state_dict(trained_only=cfg.method != "full")
        if not is_rank0():
            return None
        if cfg.method == "full":
            path = trainer.run_dir / "model"
            save_checkpoint(path, self.args, state, layout=cfg.checkpoint.export_layout, tokenizer=self.tokenizer,
                            chat_template=getattr(self.tokenizer, "chat_template", None))
        else:
            path = save_adapter(trainer.run_dir / "adapter", adapter_state_dict(state), cfg.lora, base_model=cfg.model,
                                model_args=self.args)
            if cfg.export.merged != "none":
                merged = merge_adapter(path, trainer.run_dir / "merged", base=cfg.model, to=cfg.export.merged)
                trainer.writer.print(f"merged model: {merged}")
        trainer.writer.print(f"{'model' if cfg.method == 'full' else 'adapter'}: {path}")
        return path


@dataclass
class FinetuneResult:
    run_dir: Path
    llm: Llama  # the fine-tuned model in memory (adapters not merged; on rank 0 of a single process)
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    peak_mem_gib: float = 0.0  # during training: model, activations, gradients, optimizer
    model_gib: float = 0.0  # the model's own tensors
    tokens_per_s: float = 0.0  # over the steps after the first (which pays for warm-up)
    output: Path | None = None  # the adapter directory, or the model directory of a full fine-tune

    def summary(self) -> dict:
        return {"losses": self.losses, "val_losses": self.val_losses, "peak_mem_gib": self.peak_mem_gib,
                "model_gib": self.model_gib, "tokens_per_s": self.tokens_per_s,
                "output": str(self.output) if self.output else None}


def run(cfg: FinetuneConfig) -> FinetuneResult:
    task = Finetuning(cfg)
    trainer = Trainer(cfg, task)
    try:
        trainer.fit()
    finally:
        trainer.close()
    result = FinetuneResult(trainer.run_dir, task.llm, trainer.losses, trainer.val_losses,
                            trainer.peak_mem_gib, task.model_gib, trainer.tokens_per_s, trainer.output)
    if trainer.rank == 0:  # the process group is gone: is_rank0() would be true everywhere
        (trainer.run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
        print(f"peak memory {result.peak_mem_gib:.2f} GiB (model tensors {result.model_gib:.2f} GiB)"
              + (f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""))
    return result
